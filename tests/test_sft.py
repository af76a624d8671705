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
    from notrainer.cli.run import parse_args

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_exit_status(tmp_path):
    proc = cli_subprocess("task=sft", "max_seq_length=1", f"output_dir={tmp_path}", "report_to=none", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["notrainer: error: max_seq_length must be >= 2"]


def test_sft_is_its_own_task_with_only_its_own_keys():
    """SFT is composed from shared helpers, not a CLMTask: CLM's keys are unknown to it."""
    from notrainer.cli.run import parse_args
    from notrainer.tasks.clm import CLMTask

    assert not issubclass(SFTTask, CLMTask)
    for clm_key in ("block_size=8", "line_by_line=true", "text_column=text"):
        with pytest.raises(UsageError, match="unknown"):
            parse_args(["task=sft", clm_key])
    assert parse_args(["task=sft", "chunked_loss=true"])[0].chunked_loss is True  # shared with clm, its own key


@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_gradients(tokenizer, packing):
    """chunked_loss=true (notrainer.modeling.losses, as for clm) gives the model's own loss and the same
    gradient on every parameter, over response tokens only, with and without packing; and
    eval_step gives the same per-example losses. Tolerances as in tests/test_losses.py."""
    from accelerate.utils import set_seed

    from notrainer.modeling import losses

    args = ("max_train_samples=48", f"packing={str(packing).lower()}")
    plain, chunked = _task(*args, "chunked_loss=false"), _task(*args, "chunked_loss=true")
    set_seed(0)
    model = plain.build_model(tokenizer)
    plain.setup(model, tokenizer)
    assert plain._head is None
    ds = plain.prepare_datasets(plain.load_raw_datasets(), tokenizer)
    batch = plain.collator(tokenizer)([ds["train"][i] for i in range(12)])
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    labels = batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()  # prompts masked, responses trained
    assert (batch["input_ids"].shape[0] == 1) == packing

    model.train()
    ref = plain.loss(model, batch)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_eval = plain.eval_step(model, batch)

    chunked.setup(model, tokenizer)  # installs the switchable head on the same model
    assert isinstance(chunked._head, losses.HiddenStatesHead)
    loss = chunked.loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        got_eval = chunked.eval_step(model, batch)
    assert torch.equal(got_eval["num_items"], ref_eval["num_items"]) and len(got_eval["loss"]) == 12
    torch.testing.assert_close(got_eval["loss"], ref_eval["loss"], rtol=1e-5, atol=1e-5)
    # the per-example sums give back the mean loss the model reports
    torch.testing.assert_close(got_eval["loss"].sum() / got_eval["num_items"].sum(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_chunked_loss_refuses_lora_on_the_output_layer(tokenizer, monkeypatch):
    """LoRA on lm_head and the chunked loss cannot meet (the chunked loss bypasses the head's
    forward): chunked_loss=true says so before training; auto keeps the model's loss, on CUDA too."""
    from notrainer.tasks import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto would be on

    def head_for(*args):
        task = _task("lora.r=4", "lora.target_modules=[q_proj,lm_head]", *args)
        return common.chunked_loss_head(task.cfg, task.build_model(tokenizer))

    with pytest.raises(UsageError, match=r"chunked_loss=true: lora.target_modules adapts the output layer \(lm_head\)"):
        head_for("chunked_loss=true")
    assert head_for() is None


def test_cli_chunked_loss_trains_like_the_plain_loss(tmp_path):
    """The same short packed run with and without chunked_loss: same train and eval loss."""
    common = ("task=sft", "packing=true", "max_train_steps=3", *FAST)
    plain = run_cli(*common, "chunked_loss=false", output_dir=tmp_path / "plain")
    chunked = run_cli(*common, "chunked_loss=true", output_dir=tmp_path / "chunked")
    assert abs(chunked["train_loss"] - plain["train_loss"]) < 1e-4
    assert abs(chunked["eval_loss"] - plain["eval_loss"]) < 1e-4


def _tiny_base(tmp_path, tokenizer):
    """A tiny llama and its tokenizer saved as a model folder (a user's base model)."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    from notrainer.data.builtin import tiny_config

    set_seed(1)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(tiny_config("llama", tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def test_chunked_loss_under_qlora_equals_the_plain_loss_and_adapter_gradients(tmp_path, tokenizer):
    """The 8B recipe's loss path on a tiny model (docs/finetune-8b.md): a 4-bit nf4 base, LoRA on
    top, chunked_loss=true. The head stays an nn.Linear (bitsandbytes leaves it unquantized), peft's
    k-bit preparation keeps the switch installed by setup, and the adapters get the plain gradients."""
    pytest.importorskip("bitsandbytes")
    from notrainer.modeling import losses
    from notrainer.modeling.lora import apply_lora

    base = _tiny_base(tmp_path, tokenizer)
    task = _task(f"model_name_or_path={base}", "quantization=nf4", "lora.r=4", "lora.dropout=0", "chunked_loss=true",
                 "packing=true", "max_train_samples=24")
    tok = task.build_tokenizer(task.load_raw_datasets())
    model = task.build_model(tok)
    task.setup(model, tok)
    model = apply_lora(model, task.cfg, task)
    assert isinstance(task._head, losses.HiddenStatesHead) and not task._head.weight.requires_grad
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    ds = task.prepare_datasets(task.load_raw_datasets(), tok)
    batch = {k: torch.as_tensor(v) for k, v in task.collator(tok)([ds["train"][i] for i in range(8)]).items()}
    model.train()
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref = model(**batch, use_cache=False).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in adapters.items()}
    model.zero_grad(set_to_none=True)
    loss = task.loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    for n, p in adapters.items():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_8b_recipe_runs_end_to_end_on_a_tiny_model(tmp_path, tokenizer):
    """docs/finetune-8b.md's command, every memory key at once (nf4 base, LoRA on every linear
    layer, bf16 weights and autocast, sdpa, gradient checkpointing, chunked loss, packing), on a
    tiny llama on CPU: it trains, evaluates and exports the adapter."""
    pytest.importorskip("bitsandbytes")
    base = _tiny_base(tmp_path, tokenizer)
    res = run_cli("task=sft", f"model_name_or_path={base}", "quantization=nf4", "lora.r=16",
                  "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                  "torch_dtype=bfloat16", "mixed_precision=bf16", "attn_implementation=sdpa",
                  "gradient_checkpointing=true", "chunked_loss=true", "packing=true", "max_train_steps=4",
                  "per_device_train_batch_size=4", *FAST, output_dir=tmp_path / "run")
    assert res["global_step"] == 4
    assert math.isfinite(res["train_loss"]) and math.isfinite(res["eval_loss"])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
