"""One test per function of notrainer/compat.py, the one place that touches library internals.

Each test checks what its function relies on upstream and fails with a message naming the
function and the version it was written against, so that a new release of accelerate,
transformers or peft that moves an internal is a clear failure here, not a silent degrade
somewhere in a training run.
"""

from __future__ import annotations

import copy
import inspect
import sys
import textwrap

import pytest
import torch

from notrainer import compat


def upstream(ok: bool, function: str, written_against: str, what: str) -> None:
    """Fail with one line saying which seam broke and what changed upstream."""
    if not ok:
        pytest.fail(f"notrainer.compat.{function} (written against {written_against}): upstream changed: {what}",
                    pytrace=False)


def tiny_gpt2_config(**kwargs):
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32, **kwargs)


# ---------------------------------------------------------------------- transformers


def test_model_from_config_applies_dtype_and_attention():
    from transformers import GPT2LMHeadModel, PreTrainedModel

    upstream(hasattr(PreTrainedModel, "_from_config"), "model_from_config", "transformers 5.24",
             "PreTrainedModel._from_config is gone; use its public replacement in compat.model_from_config")
    model = compat.model_from_config(GPT2LMHeadModel, tiny_gpt2_config(), dtype=torch.bfloat16,
                                     attn_implementation="eager")
    upstream(type(model) is GPT2LMHeadModel, "model_from_config", "transformers 5.24",
             f"_from_config built a {type(model).__name__}, not the class it was called on")
    dtypes = {p.dtype for p in model.parameters()}
    upstream(dtypes == {torch.bfloat16}, "model_from_config", "transformers 5.24",
             f"_from_config(dtype=bfloat16) no longer sets the weights' dtype (got {dtypes})")
    upstream(compat.attn_implementation(model.config) == "eager", "model_from_config", "transformers 5.24",
             "_from_config(attn_implementation=...) is no longer applied to the config")


def test_attn_implementation_reads_what_the_public_setter_sets():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_gpt2_config(), attn_implementation="sdpa")
    got = compat.attn_implementation(model.config)
    upstream(got == "sdpa", "attn_implementation", "transformers 5.24",
             f"config._attn_implementation is {got!r} for a model built with attn_implementation='sdpa'")
    model.set_attn_implementation("eager")  # the public setter
    got = compat.attn_implementation(model.config)
    upstream(got == "eager", "attn_implementation", "transformers 5.24",
             f"after model.set_attn_implementation('eager'), config._attn_implementation is {got!r}")


# ---------------------------------------------------------------------- peft


def test_lora_layers_give_what_peft_merges():
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    from notrainer.modeling import lora

    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    model = peft.get_peft_model(base, config)
    layers = compat.lora_layers(model)
    upstream(len(layers) == 2, "lora_layers", "peft 0.21",
             f"found {len(layers)} LoRA layers (peft.tuners.lora.LoraLayer with a 'default' adapter), expected 2")
    upstream(all(layer.scaling == 2.0 for layer in layers), "lora_layers", "peft 0.21",
             f"LoraLayer.scaling['default'] is not alpha / r: {[layer.scaling for layer in layers]}")
    upstream(all(layer.base_kind == "Conv1D" and layer.fan_in_fan_out for layer in layers), "lora_layers",
             "peft 0.21", f"get_base_layer() / fan_in_fan_out changed: {layers}")
    # The merge built on these values gives the weights peft's own (public) merge gives.
    ours = lora.merged_state_dict(model, model.state_dict())
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for layer in layers:
        key = layer.name.removeprefix("base_model.model.") + ".weight"
        upstream(torch.allclose(ours[key], reference[key], atol=1e-6), "lora_layers", "peft 0.21",
                 f"{key}: W + scaling * B @ A differs from peft's merge_and_unload")


# ---------------------------------------------------------------------- accelerate


def test_accelerate_launch_runs_the_module_and_raises_its_exit_status(tmp_path, monkeypatch):
    import subprocess

    (tmp_path / "compat_probe.py").write_text(textwrap.dedent("""
        import pathlib, sys
        pathlib.Path(sys.argv[0]).with_name("argv.txt").write_text(" ".join(sys.argv[1:]))
        sys.exit(3)
    """))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(subprocess.CalledProcessError) as e:
        compat.accelerate_launch(["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                  "--dynamo_backend", "no"], "compat_probe", ["a=1", "--b", "2"])
    upstream(e.value.returncode == 3, "accelerate_launch", "accelerate 1.15",
             f"launch_command no longer raises CalledProcessError with the child's status (got {e.value.returncode})")
    argv = (tmp_path / "argv.txt").read_text()
    upstream(argv == "a=1 --b 2", "accelerate_launch", "accelerate 1.15",
             f"launch_command_parser no longer passes the module's arguments through unchanged (got {argv!r})")


def test_cache_lomo_check_caches_the_lookup_the_optimizer_makes():
    import accelerate.optimizer

    upstream(hasattr(accelerate.optimizer, "is_lomo_available"), "cache_lomo_check", "accelerate 1.15",
             "accelerate.optimizer no longer imports is_lomo_available: drop the seam")
    source = inspect.getsource(accelerate.optimizer.AcceleratedOptimizer)
    upstream("is_lomo_available()" in source, "cache_lomo_check", "accelerate 1.15",
             "AcceleratedOptimizer no longer calls is_lomo_available(): drop the seam")
    compat.cache_lomo_check()
    compat.cache_lomo_check()  # twice: still one cached function
    check = accelerate.optimizer.is_lomo_available
    upstream(hasattr(check, "cache_info") and not hasattr(check.__wrapped__, "cache_info"), "cache_lomo_check",
             "accelerate 1.15", "is_lomo_available is not cached exactly once")
    upstream(check() == check.__wrapped__(), "cache_lomo_check", "accelerate 1.15",
             "the cached is_lomo_available() answers differently from the uncached one")


def test_run_as_fsdp_sets_the_distributed_type_prepare_reads():
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=True)
    plugin = object()
    compat.run_as_fsdp(acc, plugin)
    upstream(acc.distributed_type == DistributedType.FSDP, "run_as_fsdp", "accelerate 1.15",
             f"Accelerator.distributed_type is {acc.distributed_type} after setting the shared state")
    upstream(PartialState().distributed_type == DistributedType.FSDP, "run_as_fsdp", "accelerate 1.15",
             "PartialState().distributed_type is no longer shared process-wide")
    upstream(acc.state.fsdp_plugin is plugin, "run_as_fsdp", "accelerate 1.15", "AcceleratorState.fsdp_plugin")
    upstream("self.distributed_type == DistributedType.FSDP" in inspect.getsource(Accelerator.prepare_model),
             "run_as_fsdp", "accelerate 1.15", "prepare_model no longer decides FSDP from distributed_type")


def test_finish_trackers_finishes_and_forgets_them(tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    acc.init_trackers("probe")
    upstream(len(acc.trackers) == 1, "finish_trackers", "accelerate 1.15", "init_trackers did not fill acc.trackers")
    acc.log({"x": 1.0}, step=0)
    compat.finish_trackers(acc)
    upstream(acc.trackers == [], "finish_trackers", "accelerate 1.15", "Accelerator.trackers is no longer assignable")
    acc.log({"x": 2.0}, step=1)  # no tracker left: logging is a no-op, not an error on a finished writer
    upstream(any(tmp_path.rglob("events.out.tfevents.*")), "finish_trackers", "accelerate 1.15",
             "the finished TensorBoard tracker wrote no event file")


def test_is_prepared_loader_tells_accelerate_wrappers_from_loaders():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(8)), batch_size=2)
    prepared = Accelerator(cpu=True).prepare(loader)
    upstream(compat.is_prepared_loader(prepared), "is_prepared_loader", "accelerate 1.15",
             f"a prepared DataLoader is a {type(prepared).__name__}, not a DataLoaderShard/DataLoaderAdapter")
    upstream(not compat.is_prepared_loader(loader), "is_prepared_loader", "accelerate 1.15",
             "a plain DataLoader counts as prepared")
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    upstream(not compat.is_prepared_loader(stateful.StatefulDataLoader(list(range(8)), batch_size=2)),
             "is_prepared_loader", "accelerate 1.15", "torchdata's StatefulDataLoader counts as prepared")


def test_every_seam_function_has_a_test():
    """A function added to compat.py comes with its test here."""
    names = {n for n, f in inspect.getmembers(compat, inspect.isfunction) if f.__module__ == compat.__name__}
    tested = {n for n in names if any(n in src for src in
                                      (inspect.getsource(f) for k, f in globals().items() if k.startswith("test_")))}
    assert names == tested, f"compat functions without a test in tests/test_compat.py: {sorted(names - tested)}"
