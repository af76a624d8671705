"""task=sft: response-only labels, packing without cross-contamination, the offline default learns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from notrainer.errors import UsageError
from notrainer.tasks.sft import SIMPLE_CHAT_TEMPLATE, SFTTask, builtin_instructions, render_chat, render_prompt_response, tokenize_with_labels

from conftest import cli_subprocess, run_cli

FAST = ("max_train_samples=64", "max_eval_samples=32", "logging_steps=1000")


def _task(*args: str) -> SFTTask:
    from notrainer.run import parse_args

    cfg, task_cls = parse_args(["task=sft", *args])
    return task_cls(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    task = _task()
    tok = task.build_tokenizer(task.load_raw_datasets())
    tok.chat_template = SIMPLE_CHAT_TEMPLATE  # what setup installs on a tokenizer without one
    return tok


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """Task, tokenizer and tiny llama model as the CLI builds them, plus tokenized data."""
    from accelerate.utils import set_seed

    task = _task("max_train_samples=48")
    set_seed(0)
    model = task.build_model(tokenizer)
    task.setup(model, tokenizer)
    ds = task.prepare_datasets(task.load_raw_datasets(), tokenizer)
    return task, model.eval(), ds


def _expected(tokenizer, segments):
    """Token ids and labels built by hand from (text, is_response) segments, each tokenized alone."""
    ids, labels = [], []
    for text, is_response in segments:
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if is_response else [-100] * len(seg)
    return ids, labels


def test_chat_labels_are_exactly_the_assistant_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "you are a helpful assistant ."},
        {"role": "user", "content": "what is 2 plus 3 ?"},
        {"role": "assistant", "content": "2 plus 3 is 5 ."},
        {"role": "user", "content": "what is the capital of peru ?"},
        {"role": "assistant", "content": "the capital of peru is lima ."},
    ]
    text, spans = render_chat(tokenizer, messages)
    ids, labels = tokenize_with_labels(tokenizer, text, spans, 512, add_special_tokens=False)
    want_ids, want_labels = _expected(tokenizer, [
        ("system: you are a helpful assistant .", False), ("</s>", False),
        ("user: what is 2 plus 3 ?", False), ("</s>", False), ("assistant:", False),
        (" 2 plus 3 is 5 .", True), ("</s>", True),
        ("user: what is the capital of peru ?", False), ("</s>", False), ("assistant:", False),
        (" the capital of peru is lima .", True), ("</s>", True),
    ])
    assert ids == want_ids
    assert labels == want_labels
    assert tokenizer.decode([t for t in labels if t != -100]).replace(" ", "") == "2plus3is5.</s>thecapitalofperuislima.</s>"


def test_prompt_response_labels_and_truncation(tokenizer):
    text, spans = render_prompt_response(tokenizer, "question : what is 4 plus 4 ? answer :", " 4 plus 4 is 8 .")
    ids, labels = tokenize_with_labels(tokenizer, text, spans, 512, add_special_tokens=True)
    want_ids, want_labels = _expected(tokenizer, [
        ("question : what is 4 plus 4 ? answer :", False), (" 4 plus 4 is 8 .", True), ("</s>", True)])
    assert (ids, labels) == (want_ids, want_labels)
    n_prompt = want_labels.count(-100)
    ids, labels = tokenize_with_labels(tokenizer, text, spans, n_prompt + 2, add_special_tokens=True)
    assert labels == want_labels[:n_prompt + 2]


def _losses(task, model, tokenizer, ds, packing: bool):
    task.cfg.packing = packing
    batch = task.collator(tokenizer)([ds["train"][i] for i in range(12)])
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        return batch, task.loss(model, batch), task.eval_step(model, batch), task.num_items(batch)


def test_packed_loss_equals_padded_loss(tiny, tokenizer):
    task, model, ds = tiny
    packed, loss_p, eval_p, items_p = _losses(task, model, tokenizer, ds, packing=True)
    padded, loss_u, eval_u, items_u = _losses(task, model, tokenizer, ds, packing=False)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one row, no padding
    assert padded["input_ids"].shape[0] == 12
    assert int(items_p) == int(items_u) > 0
    assert abs(loss_p.item() - loss_u.item()) < 1e-5
    # Per example, too: the packed row is split back into its 12 examples.
    assert torch.equal(eval_p["num_items"], eval_u["num_items"])
    torch.testing.assert_close(eval_p["loss"], eval_u["loss"], atol=1e-4, rtol=1e-5)
    # The control: with a KV cache transformers skips packed-sequence detection and the
    # examples attend to each other; the loss then differs. So the test can see contamination.
    with torch.no_grad():
        leaky = model(**packed).loss
    assert abs(leaky.item() - loss_u.item()) > 1e-3


def test_packing_cli_eval_matches_padding(tmp_path):
    common = ("task=sft", "do_train=false", *FAST)
    padded = run_cli(*common, output_dir=tmp_path / "padded")
    packed = run_cli(*common, "packing=true", output_dir=tmp_path / "packed")
    assert padded["eval_loss"] > 3.0  # untrained
    assert abs(packed["eval_loss"] - padded["eval_loss"]) < 1e-5


def test_embedded_default_learns_and_answers(tmp_path):
    before = run_cli("task=sft", "do_train=false", "max_eval_samples=64", output_dir=tmp_path / "before")
    after = run_cli("task=sft", "max_train_steps=20", "max_eval_samples=64", "packing=true",
                    output_dir=tmp_path / "after")
    assert before["eval_loss"] > 4.0
    assert after["eval_loss"] < 0.55 * before["eval_loss"]
    assert math.isclose(after["eval_perplexity"], math.exp(after["eval_loss"]), rel_tol=1e-6)
    # The export is a chat model: the tokenizer carries the chat template.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "after")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "user: hi</s>assistant:"
    _check_predictions(tmp_path, tmp_path / "after", tok)


def _check_predictions(tmp_path, model_dir, tok):
    """mode=predict answers test prompts; batched (left-padded here) and packed batches give
    exactly what generating for each prompt alone gives."""
    from transformers import AutoModelForCausalLM

    questions = ["what is 3 plus 4 ?", "what is the capital of peru ?", "reverse the words : apple river stone",
                 "what is 9 plus 9 ?", "what is 0 plus 5 ?"]
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}]}) for q in questions))
    common = ("task=sft", "mode=predict", f"model_name_or_path={model_dir}", f"test_file={test}", "max_new_tokens=12")
    run_cli(*common, "per_device_eval_batch_size=4", output_dir=tmp_path / "pred")
    run_cli(*common, "per_device_eval_batch_size=2", "packing=true", output_dir=tmp_path / "pred_packed")
    records = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    packed = [json.loads(line) for line in (tmp_path / "pred_packed" / "predictions.jsonl").read_text().splitlines()]
    assert records == packed
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for q, record in zip(questions, records, strict=True):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        assert record["prompt"] == prompt
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        alone = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in alone:
            alone = alone[:alone.index(tok.eos_token_id)]
        assert record["prediction"] == tok.decode(alone, skip_special_tokens=True).strip()
    assert len(records) == len(questions) and any(r["prediction"] for r in records)


def test_prompt_response_file(tmp_path):
    rows = [{"prompt": f"what is {a} plus {b} ?", "response": f" {a + b} ."} for a in range(6) for b in range(6)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    res = run_cli("task=sft", f"train_file={path}", "max_train_steps=4", "validation_split_percentage=20",
                  output_dir=tmp_path / "run")
    assert res["global_step"] == 4 and math.isfinite(res["eval_loss"])


def test_builtin_instructions_are_deterministic():
    assert builtin_instructions() == builtin_instructions()
    train, _ = builtin_instructions()
    roles = {tuple(m["role"] for m in r["messages"]) for r in train}
    assert roles == {("user", "assistant"), ("system", "user", "assistant")}


@pytest.mark.parametrize("args, match", [
    (("messages_column=chat",), "needs a 'chat' column"),
    (("max_seq_length=100000",), "larger than the model's"),
    (("chat_template=not-a-template",), "no such file, and not a Jinja template"),
])
def test_bad_input(tmp_path, args, match):
    with pytest.raises(UsageError, match=match):
        run_cli("task=sft", *args, *FAST, output_dir=tmp_path)


def test_predict_needs_a_trained_model(tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "what is 1 plus 1 ?"}) + "\n")
    with pytest.raises(UsageError, match="without training needs model_name_or_path"):
        run_cli("task=sft", "mode=predict", f"test_file={test}", output_dir=tmp_path / "run")


def test_bad_chat_records(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "text": "no content key"}]}) + "\n")
    with pytest.raises(UsageError, match="list of"):
        run_cli("task=sft", f"train_file={path}", "do_eval=false", output_dir=tmp_path / "run")


def test_packing_refused_for_a_model_that_would_leak(tmp_path):
    # The example custom model builds its own causal mask and ignores packed position ids.
    with pytest.raises(UsageError, match="packing=true: .* would attend to each other"):
        run_cli("task=sft", "packing=true", "model_class=examples/custom_model/modeling_tiny_lm.py:TinyLMForCausalLM",
                *FAST, output_dir=tmp_path)


def test_cli_exit_status(tmp_path):
    proc = cli_subprocess("task=sft", "max_seq_length=1", f"output_dir={tmp_path}", "report_to=none", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["notrainer: error: max_seq_length must be >= 2"]


def test_sft_is_its_own_task_with_only_its_own_keys():
    """SFT is composed from shared helpers, not a CLMTask: CLM's keys are unknown to it."""
    from notrainer.run import parse_args
    from notrainer.tasks.clm import CLMTask

    assert not issubclass(SFTTask, CLMTask)
    for clm_key in ("block_size=8", "line_by_line=true", "chunked_loss=true", "text_column=text"):
        with pytest.raises(UsageError, match="unknown"):
            parse_args(["task=sft", clm_key])
