"""Preference data, shared by task=reward and task=dpo: pairs of a chosen and a rejected response.

Layouts, one record per line (column names: `prompt_column`, `chosen_column`, `rejected_column`):
  plain            {"prompt": "...", "chosen": "...", "rejected": "..."}; a response is followed by the
                   end-of-text token;
  conversational   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, or without a
                   "prompt": the messages chosen and rejected share from the start are the prompt
                   (as TRL's implicit prompt). A string prompt with message responses is one user turn.
                   Rendered with the chat template as task=sft renders chats (`chat_template=`, else the
                   tokenizer's, else a simple built-in one).

Truncation (docs/preference.md): the prompt keeps its LAST `max_prompt_length` tokens (truncated from
the left); each response keeps its FIRST `max_length - len(prompt)` tokens (truncated from the right).
A pair whose chosen and rejected are identical, or one with no response tokens left, is a one-line
error naming the row, or is dropped with a count when `drop_invalid_pairs=true`.

The collator puts a batch of B pairs into ONE batch of 2B rows, chosen rows first, then rejected
(one forward pass for both), right-padded, with labels -100 outside the responses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from notrainer.config import TrainConfig, key
from notrainer.data import builtin
from notrainer.data.files import map_splits, require_columns
from notrainer.errors import UsageError, check, first_line

from . import common
from .base import Task
from .sft import SIMPLE_CHAT_TEMPLATE, _read_template

PROBLEM_IDENTICAL = "chosen and rejected are identical"
PROBLEM_EMPTY = "no response tokens are left after truncation"


@dataclass
class PreferenceConfig(TrainConfig):
    prompt_column: str = key("prompt", "column holding prompts (text or messages; optional for conversational pairs)")
    chosen_column: str = key("chosen", "column holding the preferred responses (text or messages)")
    rejected_column: str = key("rejected", "column holding the dispreferred responses (text or messages)")
    chat_template: Optional[str] = key(None, "Jinja chat template (a file or the template itself) instead of the tokenizer's")
    max_length: Optional[int] = key(None, "tokens per prompt + response (default: min(1024, the model's positions))")
    max_prompt_length: Optional[int] = key(None, "prompt tokens kept, from the end (default: half of max_length)")
    drop_invalid_pairs: bool = key(False, "drop pairs that are identical or have no response tokens left (with a count) "
                                          "instead of stopping with an error naming the row")

    def validate(self) -> None:
        super().validate()
        check(self.max_length is None or self.max_length >= 2, "max_length must be >= 2")
        check(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length must be >= 1")
        if self.max_length is not None and self.max_prompt_length is not None:
            check(self.max_prompt_length < self.max_length,
                  f"max_prompt_length={self.max_prompt_length} leaves no room for the response within "
                  f"max_length={self.max_length}; use max_prompt_length < max_length")


class PreferenceTask(Task):
    """What reward and dpo share: data layouts, rendering, truncation, the pair collator."""

    name = "preference"
    Config = PreferenceConfig
    tiny_model_type = "llama"
    tokenizer_style = "gpt"

    #: tokens per prompt + response, and prompt tokens kept (set in setup)
    _max_len: Optional[int] = None
    _max_prompt_len: Optional[int] = None

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        return builtin.splits(*builtin_preferences())

    def tokenizer_texts(self, raw):
        cfg, ds = self.cfg, raw["train"]
        texts = []
        for col in (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column):
            if col not in ds.column_names:
                continue
            for value in ds[col]:
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):
                    texts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        return texts + ["user:", "assistant:", "system:"] * 20

    # ------------------------------------------------------------------ setup (lifecycle step 5)

    def setup(self, model, tokenizer) -> None:
        """The lengths, the chat template (as task=sft) and eos as the pad token when there is none."""
        super().setup(model, tokenizer)
        cfg = self.cfg
        self._max_len = common.fit_length("max_length", cfg.max_length, model, tokenizer, default_cap=1024)
        self._max_prompt_len = cfg.max_prompt_length or max(1, self._max_len // 2)
        check(self._max_prompt_len < self._max_len,
              f"max_prompt_length={self._max_prompt_len} leaves no room for the response within "
              f"max_length={self._max_len}")
        if cfg.chat_template:
            tokenizer.chat_template = _read_template(cfg.chat_template)
        elif tokenizer.chat_template is None:
            tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE  # saved with the tokenizer at export
        check(tokenizer.eos_token is not None, f"task={self.name} needs a tokenizer with an end-of-text (eos) token")
        if tokenizer.pad_token is None:  # labels and the attention mask come from our own lengths
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ tokenized pairs

    def prepare_datasets(self, raw, tokenizer):
        import datasets

        cfg = self.cfg
        splits = {name: split for name, split in raw.items() if name != "test"}
        check(splits, f"task={self.name} needs preference pairs (train_file or validation_file)")
        for split in splits.values():
            require_columns(split, {"chosen_column": cfg.chosen_column, "rejected_column": cfg.rejected_column})
        out = map_splits(datasets.DatasetDict(splits), self.encoder(tokenizer), cfg, desc="tokenizing pairs",
                         with_indices=True)
        return datasets.DatasetDict({name: self._settle_problems(name, split) for name, split in out.items()})

    def extra_columns(self) -> dict[str, str]:
        """Optional numeric per-pair columns carried into the batch: {batch key: column name}."""
        return {}

    def encoder(self, tokenizer):
        cfg = self.cfg
        max_len, max_prompt = self._max_len, self._max_prompt_len
        extras = self.extra_columns()

        def encode(batch, indices):
            rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "row": [], "problem": []}
            rows.update({k: [] for k in extras})
            for i, index in enumerate(indices):
                prompt = batch[cfg.prompt_column][i] if cfg.prompt_column in batch else None
                try:
                    p, c, r, chat = render_pair(tokenizer, prompt, batch[cfg.chosen_column][i],
                                                batch[cfg.rejected_column][i])
                except UsageError as e:
                    raise UsageError(f"row {index}: {e}") from None
                p_ids = tokenizer(p, add_special_tokens=not chat)["input_ids"] if p else []
                c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
                r_ids = tokenizer(r, add_special_tokens=False)["input_ids"]
                p_ids, c_ids, r_ids = truncate_pair(p_ids, c_ids, r_ids, max_len, max_prompt)
                problem = ""
                if not c_ids or not r_ids:
                    problem = PROBLEM_EMPTY
                elif c_ids == r_ids:
                    problem = PROBLEM_IDENTICAL if c == r else PROBLEM_IDENTICAL + " after truncation"
                rows["prompt_ids"].append(p_ids)
                rows["chosen_ids"].append(c_ids)
                rows["rejected_ids"].append(r_ids)
                rows["row"].append(index)
                rows["problem"].append(problem)
                for k, col in extras.items():
                    value = batch[col][i] if col in batch else 0.0
                    try:
                        rows[k].append(float(value if value is not None else 0.0))
                    except (TypeError, ValueError):
                        raise UsageError(f"row {index}: {col}={value!r} is not a number") from None
            return rows

        return encode

    def _settle_problems(self, name: str, split):
        """Invalid pairs: one line naming the first, or dropped with a count (drop_invalid_pairs)."""
        problems = split["problem"]
        bad = [i for i, p in enumerate(problems) if p]
        if bad:
            first = bad[0]
            where = (f"max_prompt_length={self._max_prompt_len}, max_length={self._max_len}"
                     if "truncation" in problems[first] else "")
            if not self.cfg.drop_invalid_pairs:
                raise UsageError(f"{name} row {split['row'][first]}: {problems[first]}"
                                 f"{' (' + where + ')' if where else ''}; fix the data or set drop_invalid_pairs=true"
                                 + (f" ({len(bad)} such pairs in {name})" if len(bad) > 1 else ""))
            counts = {p: problems.count(p) for p in sorted(set(problems) - {""})}
            from notrainer.engine.processes import is_rank0

            if is_rank0():
                print(f"{name}: dropped {len(bad)} of {len(split)} pairs: "
                      + ", ".join(f"{n} {p}" for p, n in counts.items()), flush=True)
            keep = set(range(len(split))) - set(bad)
            split = split.select(sorted(keep))
        split = split.remove_columns(["problem"])
        if name == "train":
            check(len(split) > 0, "no training pair is left")
        return split

    def collator(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return PairCollator(pad_token_id=pad, pad_to_multiple_of=8 if torch.cuda.is_available() else None,
                            extra_keys=tuple(self.extra_keys()))

    def extra_keys(self) -> list[str]:
        """Per-pair float columns the collator passes on (margin, reference log-probs)."""
        return list(self.extra_columns())

    # ------------------------------------------------------------------ bookkeeping

    def num_items(self, batch):
        """The loss is a mean over pairs: gradient accumulation weighs micro-batches by pairs."""
        return batch["input_ids"].shape[0] // 2


# ---------------------------------------------------------------------- rendering and truncation


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def render_pair(tokenizer, prompt, chosen, rejected) -> tuple[str, str, str, bool]:
    """(prompt text, chosen text, rejected text, conversational?) of one record."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        check(prompt is None or isinstance(prompt, str), "a plain pair needs a text prompt")
        eos = tokenizer.eos_token or ""
        return prompt or "", chosen + eos, rejected + eos, False
    check(_is_messages(chosen) and _is_messages(rejected),
          "chosen and rejected must both be strings or both lists of {\"role\": ..., \"content\": ...} messages")
    if prompt is None:  # the implicit prompt: the messages both responses start with
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt_msgs, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        check(_is_messages(prompt), "prompt must be a string or a list of {\"role\": ..., \"content\": ...} messages")
        prompt_msgs = prompt
    check(chosen and rejected, "chosen and rejected need at least one message after the prompt")
    try:
        p = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True) if prompt_msgs else ""
        texts = []
        for response in (chosen, rejected):
            full = tokenizer.apply_chat_template(prompt_msgs + response, tokenize=False)
            check(full.startswith(p), "the chat template renders a conversation differently when a turn is appended, "
                                      "so the response cannot be located; set chat_template=...")
            texts.append(full[len(p):])
    except UsageError:
        raise
    except Exception as e:  # template errors (e.g. roles must alternate) are data problems
        raise UsageError(f"the chat template failed: {first_line(e)}") from None
    return p, texts[0], texts[1], True


def truncate_pair(prompt: list, chosen: list, rejected: list, max_len: int, max_prompt: int):
    """The prompt keeps its last `max_prompt` tokens; each response its first `max_len - len(prompt)`."""
    prompt = prompt[-max_prompt:] if len(prompt) > max_prompt else prompt
    room = max(0, max_len - len(prompt))
    return prompt, chosen[:room], rejected[:room]


class PairCollator:
    """B tokenized pairs -> one batch of 2B rows (chosen rows, then rejected rows), right-padded;
    labels are the response tokens (-100 elsewhere); `extra_keys` pass on as (B,) float tensors."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, extra_keys: tuple = ()):
        self.pad_token_id, self.pad_to_multiple_of, self.extra_keys = pad_token_id, pad_to_multiple_of, extra_keys

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for f in features:
                p, resp = list(f["prompt_ids"]), list(f[side])
                seqs.append(p + resp)
                labels.append([-100] * len(p) + resp)
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(seqs)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        lab = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            lab[i, :len(l)] = torch.tensor(l, dtype=torch.long)
            mask[i, :len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": lab}
        for k in self.extra_keys:
            if k in features[0]:
                batch[k] = torch.tensor([float(f[k]) for f in features], dtype=torch.float32)
        return batch


def model_inputs(batch: dict) -> dict:
    """The keys a model's forward takes (not labels, margins or reference log-probs)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


# ---------------------------------------------------------------------- built-in preference pairs

_TOPICS = ("river garden city forest market school bridge harbor village library museum station castle island "
           "valley kitchen theater desert meadow tower").split()
_GOOD = "good great lovely bright calm pleasant wonderful friendly".split()
_BAD = "bad awful ugly dark noisy boring terrible gloomy".split()
_ASK = ("tell me about the {t} .", "describe the {t} .", "what do you think of the {t} ?", "how is the {t} ?")
_SAY = ("the {t} is {a} .", "i think the {t} is {a} .", "the {t} looks {a} today .")


def builtin_preferences(n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Pairs with a rule a tiny model learns: the chosen response describes the prompt's topic with a
    kind word, the rejected one the same way with an unkind word. Held-out pairs are combinations
    (topic, wording, words) not in the training pairs."""
    rng = random.Random(seed)
    seen: set = set()

    def one(avoid: set | None) -> dict:
        while True:
            t, q, s = rng.choice(_TOPICS), rng.choice(_ASK), rng.choice(_SAY)
            g, b = rng.choice(_GOOD), rng.choice(_BAD)
            combo = (t, q, s, g, b)
            if avoid is None or combo not in avoid:
                break
        seen.add(combo)
        return {"prompt": q.format(t=t) + " ", "chosen": s.format(t=t, a=g), "rejected": s.format(t=t, a=b)}

    train = [one(None) for _ in range(n_train)]
    held = set(seen)
    return train, [one(held) for _ in range(n_eval)]


__all__ = ["PreferenceConfig", "PreferenceTask", "PairCollator", "render_pair", "truncate_pair", "builtin_preferences"]
