"""Supervised fine-tuning of a causal LM on chats or prompt/response pairs.

    accelerate launch -m notrainer.run task=sft model_name_or_path=Qwen/Qwen2-0.5B train_file=chats.jsonl

Data, one record per line:
  chat             {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                   rendered with the tokenizer's chat template (or `chat_template=`, or a simple built-in
                   one when the tokenizer has none);
  prompt/response  {"prompt": "...", "response": "..."}  (`prompt_column`, `response_column`),
                   the response followed by the end-of-text token.

Only response (assistant) tokens are trained: every other label is -100. `packing=true` puts a
whole micro-batch in one row without padding (transformers' DataCollatorWithFlattening): the
position ids restart at every example, which the model's attention turns into a block-diagonal
mask, so examples never see each other. Metrics: eval_loss and eval_perplexity over response
tokens.
"""

from __future__ import annotations

import copy
import random
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from notrainer import compat
from notrainer.data import builtin
from notrainer.modeling import losses
from notrainer.config import TrainConfig, key
from notrainer.data.files import map_splits, require_columns
from notrainer.errors import UsageError, check, first_line

from . import common
from .base import Task
from .clm import perplexity, shifted_targets

#: Used when the tokenizer has no chat template of its own (the built-in tokenizer, base models).
#: Every turn is "role: content<eos>" (no newline: the built-in tokenizer has none in its vocabulary);
#: the generation prompt is "assistant:".
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@dataclass
class SFTConfig(TrainConfig):
    messages_column: str = key("messages", "column holding chats: lists of {role, content}")
    prompt_column: str = key("prompt", "column holding prompts (prompt/response data)")
    response_column: str = key("response", "column holding responses (prompt/response data)")
    chat_template: Optional[str] = key(None, "Jinja chat template (a file or the template itself) instead of the tokenizer's")
    max_seq_length: Optional[int] = key(None, "truncate examples to this many tokens (default: min(1024, the model's positions))")
    packing: bool = key(False, "pack each micro-batch into one row without padding; attention stays inside each example")
    max_new_tokens: int = key(128, "do_predict: most tokens generated per response (greedy)")
    chunked_loss: Optional[bool] = key(None, "lm_head + cross-entropy in chunks over response tokens, never the full "
                                             "fp32 logits (docs/performance.md); default: on when CUDA is available")

    def validate(self) -> None:
        super().validate()
        check(self.max_seq_length is None or self.max_seq_length >= 2, "max_seq_length must be >= 2")


class SFTTask(Task):
    name = "sft"
    Config = SFTConfig
    auto_model = "AutoModelForCausalLM"
    tiny_model_type = "llama"  # its attention honours packed position ids (see setup)
    tokenizer_style = "gpt"
    supports_streaming = True
    embedded_defaults = dict(learning_rate=3e-3, num_train_epochs=2.0, per_device_train_batch_size=16,
                             per_device_eval_batch_size=32, warmup_ratio=0.05, lr_scheduler_type="cosine",
                             weight_decay=0.01)

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        return builtin.splits(*builtin_instructions())

    def tokenizer_texts(self, raw):
        ds = raw["train"]
        if self.data_format(ds) == "chat":
            # Malformed records are reported by render_chat; here just skip what is not text.
            turns = [m for chat in ds[self.cfg.messages_column] for m in (chat or []) if isinstance(m, dict)]
            texts = [m["content"] for m in turns if isinstance(m.get("content"), str)]
            roles = {m["role"] for m in turns if isinstance(m.get("role"), str)}
            return texts + [f"{r}:" for r in sorted(roles)] * 20
        return list(ds[self.cfg.prompt_column]) + list(ds[self.cfg.response_column])

    #: set by check_raw_rows (lifecycle step 2): chat roles outside STANDARD_ROLES -> (file, first row)
    _other_roles: Optional[dict] = None

    def check_raw_rows(self, ds, where: str) -> None:
        """Chat roles outside the standard ones, with the first row of each (file order);
        `setup` refuses those the chat template does not know either."""
        column = self.cfg.messages_column
        if column not in ds.column_names:
            return
        roles = chat_roles(ds, column)
        if self._other_roles is None:
            self._other_roles = {}
        for role in sorted(roles - set(STANDARD_ROLES) - set(self._other_roles)):
            row = next(i for i, chat in enumerate(ds[column])
                       if any(isinstance(m, dict) and m.get("role") == role for m in chat or []))
            self._other_roles[role] = (where, row + 1)

    def data_format(self, ds, need_response: bool = True) -> str:
        cfg = self.cfg
        if cfg.messages_column in ds.column_names:
            return "chat"
        if cfg.prompt_column in ds.column_names and (cfg.response_column in ds.column_names or not need_response):
            return "prompt_response"
        raise UsageError(f"task=sft needs a {cfg.messages_column!r} column (chats) or {cfg.prompt_column!r} and "
                         f"{cfg.response_column!r} columns; the data has {', '.join(ds.column_names)} "
                         "(set messages_column=, or prompt_column= and response_column=)")

    # ------------------------------------------------------------------ setup (lifecycle step 5)

    #: tokens per example: max_seq_length, else what the model fits
    _max_len: Optional[int] = None
    #: the tokenizer, its chat template and pad token settled (prediction decodes with it)
    _tokenizer = None
    #: set by prepare_datasets: the test split's prompts, in order, for the prediction records
    _prompts: Optional[list] = None
    #: the switchable lm_head when the chunked loss is on (notrainer.modeling.losses), else None
    _head = None

    def setup(self, model, tokenizer) -> None:
        """Settles the example length and the tokenizer: the chat template (chat_template=,
        else the tokenizer's, else SIMPLE_CHAT_TEMPLATE, saved with it at export) and, without
        packing, eos as the pad token when it has none."""
        super().setup(model, tokenizer)
        cfg = self.cfg
        self._max_len = common.fit_length("max_seq_length", cfg.max_seq_length, model, tokenizer, default_cap=1024)
        self._tokenizer = tokenizer
        self._head = common.chunked_loss_head(cfg, model)
        if cfg.chat_template:
            tokenizer.chat_template = _read_template(cfg.chat_template)
        elif tokenizer.chat_template is None:
            tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE  # saved with the tokenizer at export
        check(tokenizer.eos_token is not None, "task=sft needs a tokenizer with an end-of-text (eos) token")
        known = template_roles(tokenizer.chat_template)
        for role, (where, row) in (self._other_roles or {}).items():
            check(role in known, f"{where} row {row}: chat role {role!r} is not one the chat template knows "
                                 f"({', '.join(known)}); rename it, or set chat_template=... to one that has it")
        if cfg.packing:
            check(packing_is_isolated(model),
                  f"packing=true: {type(model).__name__} does not build its attention mask from packed position "
                  "ids, so packed examples would attend to each other; use packing=false")
        elif tokenizer.pad_token is None:
            # Labels come from our own mask, never from pad positions, so padding with eos is harmless.
            tokenizer.pad_token = tokenizer.eos_token

    def prepare_datasets(self, raw, tokenizer):
        cfg, max_len = self.cfg, self._max_len
        labelled = {name: split for name, split in raw.items() if name != "test"}
        fmt = self.data_format(labelled["train"] if "train" in labelled else next(iter(labelled.values())), True) \
            if labelled else self.data_format(raw["test"], need_response=False)
        for split in labelled.values():
            if fmt == "chat":
                require_columns(split, {"messages_column": cfg.messages_column})
            else:
                require_columns(split, {"prompt_column": cfg.prompt_column, "response_column": cfg.response_column})

        import datasets

        out = map_splits(datasets.DatasetDict(labelled), self.encoder(tokenizer, fmt), cfg, desc="tokenizing")
        if "test" in raw:
            out["test"] = self.prepare_prompts(raw["test"], tokenizer, fmt)
        if "train" in out:
            check(len(out["train"]) > 0, f"no training example has a response within max_seq_length={max_len} tokens")
        return out

    def encoder(self, tokenizer, fmt: str):
        """The batched encoding (rows -> input_ids and labels with the prompt masked), shared by
        the map-style path and the stream."""
        cfg, max_len = self.cfg, self._max_len

        def encode(batch):
            rows = {"input_ids": [], "labels": []}
            n = len(next(iter(batch.values())))
            for i in range(n):
                if fmt == "chat":
                    text, spans = render_chat(tokenizer, batch[cfg.messages_column][i])
                else:
                    text, spans = render_prompt_response(tokenizer, batch[cfg.prompt_column][i],
                                                         batch[cfg.response_column][i])
                ids, labels = tokenize_with_labels(tokenizer, text, spans, max_len, add_special_tokens=fmt != "chat")
                # An example whose response was cut away entirely teaches nothing: drop it.
                if any(x != -100 for x in labels[1:]):
                    rows["input_ids"].append(ids)
                    rows["labels"].append(labels)
            return rows

        return encode

    def train_stream(self, raw, tokenizer, rank: int, world_size: int):
        """One encoded example per item; packing stays the collator's (packing=true)."""
        from notrainer.data.files import keeps_linebreaks
        from notrainer.data.mixture import training_stream
        from notrainer.data.streaming import build_example_stream

        cfg, encode = self.cfg, self.encoder(tokenizer, self.data_format(raw["train"]))

        def part(files, **kw):  # one source (a mixture: each of its sources)
            return build_example_stream(files, encode, keep_linebreaks=keeps_linebreaks(cfg), **kw)

        return training_stream(cfg, part, rank, world_size)

    def collator(self, tokenizer):
        if self.cfg.packing:
            from transformers import DataCollatorWithFlattening

            return DataCollatorWithFlattening()
        from transformers import DataCollatorForSeq2Seq

        # Right padding: absolute position embeddings (gpt2) would shift under left padding.
        tok = copy.copy(tokenizer)
        tok.padding_side = "right"
        return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100,
                                      pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    # ------------------------------------------------------------------ loss and metrics

    def loss(self, model, batch):
        # Prompt tokens and packed-example boundaries carry label -100 (tokenize_with_labels,
        # DataCollatorWithFlattening), so both paths train on response tokens only.
        if self._head is not None:
            return common.chunked_lm_loss(self.cfg, model, self._head, batch)
        # use_cache=False matters for packing: with a cache, transformers skips the packed-sequence
        # detection and the examples of a row would attend to each other.
        return model(**batch, use_cache=False).loss

    def eval_step(self, model, batch):
        per_token = common.lm_per_token_losses(self.cfg, model, self._head, batch, use_cache=False)
        targets = losses.shift_labels(batch["labels"])
        if "position_ids" not in batch or "attention_mask" in batch:
            return losses.per_example(per_token, targets)
        # A packed row: split the per-token losses back into examples (position 0 starts one),
        # so that every example is one row of the gathered outputs. Position t predicts the
        # label at t + 1, so it belongs to the example of t + 1 (the row's last position
        # predicts nothing and is dropped).
        per_token, labels = per_token[:, :-1], batch["labels"][:, 1:]
        example = (batch["position_ids"] == 0).cumsum(-1)[:, 1:] - 1  # example index of each target
        n = int((batch["position_ids"] == 0).sum())
        loss = torch.zeros(n, device=per_token.device, dtype=per_token.dtype).index_add_(
            0, example.flatten(), per_token.flatten())
        count = torch.zeros(n, device=per_token.device, dtype=torch.long).index_add_(
            0, example.flatten(), (labels != -100).long().flatten())
        return {"loss": loss, "num_items": count}

    def num_items(self, batch):
        return shifted_targets(batch)

    def compute_metrics(self, outputs, eval_loss):
        return perplexity(eval_loss)

    # ------------------------------------------------------------------ prediction mode (do_predict)

    def prepare_prompts(self, ds, tokenizer, fmt: str):
        """The test split as prompts to answer: a chat up to its last assistant turn (dropped
        if present) plus the generation prompt, or the prompt column."""
        cfg = self.cfg
        if fmt == "chat":
            require_columns(ds, {"messages_column": cfg.messages_column})
        else:
            require_columns(ds, {"prompt_column": cfg.prompt_column})
        prompts = []
        for i in range(len(ds)):
            if fmt == "chat":
                messages = ds[i][cfg.messages_column]
                if messages and messages[-1].get("role") == "assistant":
                    messages = messages[:-1]
                render_chat(tokenizer, messages)  # validates the records
                prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            else:
                prompts.append(ds[i][cfg.prompt_column])
        self._prompts = prompts
        enc = tokenizer(prompts, add_special_tokens=fmt != "chat", truncation=True,
                        max_length=max(1, self._max_len - cfg.max_new_tokens))
        import datasets

        return datasets.Dataset.from_dict({"input_ids": enc["input_ids"]})

    def predict_step(self, model, batch):
        """Greedy answers to a batch of prompts, left-padded here whatever the collator did."""
        tok = self._tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = _unpad_rows(batch)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=rows[0].device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        generated = getattr(model, "module", model).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=tok.eos_token_id, synced_gpus=common.sharded_reason() is not None)
        return {"generated": generated[:, width:]}

    def format_predictions(self, outputs, dataset):
        tok = self._tokenizer
        texts = []
        for rows in outputs.get("generated", []):
            for row in rows:
                row = [int(t) for t in row if t >= 0]  # -100: padding added across processes
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id)]
                texts.append(tok.decode(row, skip_special_tokens=True).strip())
        return [{"prompt": p, "prediction": t} for p, t in zip(self._prompts, texts)]


# ---------------------------------------------------------------------- rendering and masking

#: the roles every chat template is expected to render (the OpenAI chat format's)
STANDARD_ROLES = ("system", "user", "assistant", "tool")


def chat_roles(ds, column: str) -> set:
    """Every role in a chat column, read through arrow (no Python pass over the rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = ds.with_format("arrow")[column]
    try:
        turns = pc.list_flatten(values)
        if pa.types.is_struct(turns.type) and turns.type.get_field_index("role") >= 0:
            return {r for r in pc.unique(pc.struct_field(turns, "role")).to_pylist() if isinstance(r, str)}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
        pass
    return {m.get("role") for chat in ds[column] if isinstance(chat, list) for m in chat
            if isinstance(m, dict) and isinstance(m.get("role"), str)}


def template_roles(template: str | None) -> list[str]:
    """The roles a chat template knows: the standard ones and every role it names
    (`message['role'] == 'robot'`, `message.role == "robot"`)."""
    import re

    named = re.findall(r"""role['"]?\]?\s*==\s*['"]([^'"]+)['"]""", template or "")
    return list(dict.fromkeys([*STANDARD_ROLES, *named]))


def render_chat(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns.

    Each assistant turn's span is what the template adds between "the chat so far plus the
    generation prompt" and "the chat including that turn": the reply and its end marker.
    """
    check(isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages),
          "every chat must be a list of {\"role\": ..., \"content\": ...} messages")
    spans = []
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            check(through.startswith(before), "the chat template renders a conversation differently when a turn "
                                              "is appended, so assistant turns cannot be located; set chat_template=...")
            spans.append((len(before), len(through)))
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except UsageError:
        raise
    except Exception as e:  # template errors (e.g. roles must alternate) are data problems
        raise UsageError(f"the chat template failed on a record: {first_line(e)}") from None
    return text, spans


def render_prompt_response(tokenizer, prompt: str, response: str) -> tuple[str, list[tuple[int, int]]]:
    check(isinstance(prompt, str) and isinstance(response, str), "prompt and response must be strings")
    text = prompt + response + tokenizer.eos_token
    return text, [(len(prompt), len(text))]


def tokenize_with_labels(tokenizer, text: str, spans, max_len: int, add_special_tokens: bool):
    """Token ids and labels: a token is a target when its characters overlap a response span."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    truncation=True, max_length=max_len)
    labels = []
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(tok if inside else -100)
    return enc["input_ids"], labels


def _unpad_rows(batch) -> list[torch.Tensor]:
    """The examples of a collated batch as 1-D token tensors: split a packed row where the
    position ids restart, or cut each padded row to its attention mask."""
    ids = batch["input_ids"]
    if "attention_mask" in batch:
        return [row[m.bool()] for row, m in zip(ids, batch["attention_mask"])]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
    return [ids[0, a:b] for a, b in zip(starts, starts[1:])]


def packing_is_isolated(model) -> bool:
    """True when the model keeps packed examples apart: flash-attention varlen kernels read the
    position ids directly; the sdpa/eager/flex paths do it through transformers' mask builder
    (create_causal_mask), which turns restarting position ids into a block-diagonal mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = compat.attn_implementation(base.config) or ""
    if impl.startswith("flash_attention"):
        return True
    module = sys.modules.get(type(base).__module__)
    return hasattr(module, "create_causal_mask")


def _read_template(value: str) -> str:
    import os

    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    check("{" in value, f"chat_template={value!r}: no such file, and not a Jinja template")
    return value


# ---------------------------------------------------------------------- built-in instructions

_CAPITALS = {
    "france": "paris", "spain": "madrid", "italy": "rome", "germany": "berlin", "japan": "tokyo",
    "egypt": "cairo", "peru": "lima", "kenya": "nairobi", "norway": "oslo", "greece": "athens",
    "canada": "ottawa", "china": "beijing", "russia": "moscow", "cuba": "havana", "chile": "santiago",
    "poland": "warsaw", "austria": "vienna", "ireland": "dublin", "portugal": "lisbon", "sweden": "stockholm",
}
_WORDS = "apple river stone cloud tiger lamp green music bread candle ocean pencil mountain silver window".split()
_SYSTEM = "you are a helpful assistant ."


def builtin_instructions(n_train: int = 1200, n_eval: int = 120, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Chats a tiny model can learn: capitals (a fixed table), sums of small numbers, and
    reversing a list of words (copying from the prompt). Eval chats are drawn the same way."""
    rng = random.Random(seed)

    def one() -> dict:
        kind = rng.random()
        if kind < 0.34:
            country = rng.choice(sorted(_CAPITALS))
            q, a = f"what is the capital of {country} ?", f"the capital of {country} is {_CAPITALS[country]} ."
        elif kind < 0.67:
            x, y = rng.randint(0, 9), rng.randint(0, 9)
            q, a = f"what is {x} plus {y} ?", f"{x} plus {y} is {x + y} ."
        else:
            words = rng.sample(_WORDS, rng.randint(2, 4))
            q, a = "reverse the words : " + " ".join(words), " ".join(reversed(words))
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": _SYSTEM})
        return {"messages": messages}

    return [one() for _ in range(n_train)], [one() for _ in range(n_eval)]
