"""Model loading keys (notrainer/modeling/loading.py): torch_dtype and attn_implementation reach the model
on both paths (from_pretrained and from_config), requests the install cannot serve are one line,
and QLoRA (quantization=nf4 + lora.r) trains on CPU with bitsandbytes."""

from __future__ import annotations

import warnings

import pytest
import torch

from notrainer.errors import UsageError

from conftest import run_cli

FAST = ("max_train_samples=64", "max_eval_samples=16", "logging_steps=1000")


def _model(*args: str):
    """The model the CLI would train with these keys (built, not trained)."""
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=sft", *args])
    task = task_cls(cfg)
    return task.build_model(task.build_tokenizer(task.load_raw_datasets()))


@pytest.mark.parametrize("pretrained", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_dtype_sets_the_weights_dtype(base_folder, pretrained, dtype):
    where = (f"model_name_or_path={base_folder}",) if pretrained else ()
    model = _model(*where, f"torch_dtype={dtype}")
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


def test_torch_dtype_auto_keeps_the_saved_dtype(base_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16).save_pretrained(tmp_path)
    for f in base_folder.iterdir():  # the tokenizer beside the bf16 weights
        if f.name.startswith(("tokenizer", "special")):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    model = _model(f"model_name_or_path={tmp_path}", "torch_dtype=auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("pretrained", [True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model_config(base_folder, pretrained, attn):
    where = (f"model_name_or_path={base_folder}",) if pretrained else ()
    model = _model(*where, f"attn_implementation={attn}")
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("args, match", [
    (("torch_dtype=bf16",), "torch_dtype must be one of auto, bfloat16, float16, float32"),
    (("attn_implementation=flash",), "attn_implementation='flash' is unknown"),
    (("quantization=nf3", "lora.r=4", "model_name_or_path=BASE"), "quantization must be one of nf4, fp4, int8"),
    (("quantization=nf4", "model_name_or_path=BASE"), "set lora.r"),
    (("quantization=nf4", "lora.r=4"), "give model_name_or_path"),
    (("quantization=nf4", "load_in_8bit=true", "lora.r=4", "model_name_or_path=BASE"), "give one of them"),
    (("load_in_4bit=true", "lora.r=4", "lora.merge=true", "model_name_or_path=BASE"), "cannot fold adapters"),
])
def test_bad_loading_keys_are_one_line_before_anything_loads(base_folder, tmp_path, args, match):
    args = tuple(a.replace("BASE", str(base_folder)) for a in args)
    with pytest.raises(UsageError, match=match):
        run_cli("task=sft", *args, *FAST, output_dir=tmp_path)


def test_flash_attention_without_flash_attn_is_refused_in_one_line(tmp_path):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(UsageError, match="needs the flash-attn package"):
        run_cli("task=sft", "attn_implementation=flash_attention_2", *FAST, output_dir=tmp_path)


@pytest.mark.parametrize("quant, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantization_loads_bitsandbytes_layers_under_the_adapters(base_folder, quant, layer):
    pytest.importorskip("bitsandbytes")
    from notrainer.modeling.lora import apply_lora
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=sft", f"model_name_or_path={base_folder}", f"quantization={quant}", "lora.r=4"])
    task = task_cls(cfg)
    model = apply_lora(task.build_model(task.build_tokenizer(task.load_raw_datasets())), cfg, task)
    kinds = {type(m).__name__ for m in model.modules()}
    assert layer in kinds
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_its_loss_falls(base_folder, tmp_path):
    """QLoRA end to end: the base loaded in 4-bit nf4, LoRA on top, eval loss before and after."""
    pytest.importorskip("bitsandbytes")
    common = ("task=sft", f"model_name_or_path={base_folder}", "quantization=nf4", "lora.r=8", "lora.dropout=0",
              "learning_rate=1e-2", *FAST)
    before = run_cli(*common, "do_train=false", output_dir=tmp_path / "before")
    with warnings.catch_warnings(record=True) as caught:  # 15 steps: an evaluation after the first epoch, then more
        warnings.simplefilter("always")
        after = run_cli(*common, "max_train_steps=15", output_dir=tmp_path / "after")
    # bitsandbytes' CPU inference kernel has no backward: it must never run in a training step
    assert not [w for w in caught if "gemv_4bit" in str(w.message)]
    assert after["global_step"] == 15
    assert after["eval_loss"] < before["eval_loss"] - 0.3, (before["eval_loss"], after["eval_loss"])
    assert (tmp_path / "after" / "adapter_model.safetensors").is_file()
