"""optim= (the Trainer's optimizer names) and optim_args: each optimizer trains a tiny model,
the name and the extra arguments are checked before training with one clear line."""

from __future__ import annotations

import types

import pytest
import torch

from notrainer.errors import UsageError
from notrainer.modeling.optim import (OPTIMIZERS, BITSANDBYTES, DEEPSPEED_ADAMS, build_optimizer, param_groups,
                                      parse_optim_args, resolve_optim)

TORCH_ONLY = [name for name in OPTIMIZERS if name not in BITSANDBYTES]


def _cfg(optim: str, optim_args: str | None = None, learning_rate: float = 1e-2):
    return types.SimpleNamespace(optim=optim, optim_args=optim_args, learning_rate=learning_rate, weight_decay=0.01,
                                 adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)


def _train(optim: str, optim_args: str | None = None, steps: int = 40) -> list[float]:
    """A two-layer regression net, big enough (> 4096 weights) for bitsandbytes' 8-bit state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    x = torch.randn(64, 32)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = build_optimizer(model, _cfg(optim, optim_args), torch.device("cpu"))
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optim", TORCH_ONLY)
@pytest.mark.slow
def test_each_optimizer_trains(optim):
    if optim in DEEPSPEED_ADAMS:
        pytest.importorskip("deepspeed")
        if optim == "deepspeed_fused_adam" and torch.cuda.is_available():
            pytest.skip("a CUDA kernel, and this net is on the CPU (without CUDA DeepSpeed's CPU build of it runs)")
    losses = _train(optim, "momentum=0.9" if optim == "sgd" else None)
    assert losses[-1] < 0.5 * losses[0], (optim, losses[0], losses[-1])


@pytest.mark.parametrize("optim", sorted(BITSANDBYTES))
def test_each_8bit_optimizer_trains(optim):
    pytest.importorskip("bitsandbytes")
    losses = _train(optim)
    assert losses[-1] < 0.5 * losses[0], (optim, losses[0], losses[-1])


def test_the_optimizer_classes_and_arguments():
    from transformers.optimization import Adafactor

    model = torch.nn.Linear(4, 4)
    cpu = torch.device("cpu")
    adamw = build_optimizer(model, _cfg("adamw_torch"), cpu)
    assert type(adamw) is torch.optim.AdamW and not adamw.defaults["fused"]  # CPU: today's numbers
    assert build_optimizer(model, _cfg("adamw_torch_fused"), cpu).defaults["fused"]
    ada = build_optimizer(model, _cfg("adafactor"), cpu)
    assert type(ada) is Adafactor and ada.defaults["lr"] == 1e-2 and not ada.defaults["relative_step"]
    sgd = build_optimizer(model, _cfg("sgd", "momentum=0.9,nesterov=true"), cpu)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    betas = build_optimizer(model, _cfg("adamw_torch", "betas=(0.9,0.95),amsgrad=True"), cpu)
    assert betas.defaults["betas"] == (0.9, 0.95) and betas.defaults["amsgrad"] is True
    # no weight decay on biases (1-d tensors), whatever the optimizer
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.01, 0.0]


def test_optim_args_syntax():
    assert parse_optim_args(None) == {}
    assert parse_optim_args("momentum=0.9, nesterov=TRUE, betas=(0.9,0.95), name=x") == \
        {"momentum": 0.9, "nesterov": True, "betas": (0.9, 0.95), "name": "x"}
    with pytest.raises(UsageError, match="is not key=value"):
        parse_optim_args("momentum")


def test_unknown_optim_and_bad_args_are_refused_before_training():
    from notrainer.cli.run import parse_args

    with pytest.raises(UsageError, match=r"optim 'adamw_troch' is unknown \(did you mean adamw_torch\?\)"):
        parse_args(["task=clm", "optim=adamw_troch"])
    with pytest.raises(UsageError, match="optim_args: momentom is not an argument of optim=sgd"):
        parse_args(["task=clm", "optim=sgd", "optim_args=momentom=0.9"])
    cfg, _ = parse_args(["task=clm", "optim=sgd", "optim_args=momentum=0.9"])
    assert cfg.optim == "sgd" and cfg.optim_args == "momentum=0.9"
    with pytest.raises(UsageError, match="optim=sgd could not be built"):  # a bad value: one line, not a traceback
        build_optimizer(torch.nn.Linear(2, 2), _cfg("sgd", "momentum=-1"), torch.device("cpu"))


def test_deepspeed_fused_adam_without_cuda_is_refused_before_training():
    from notrainer.cli.run import parse_args

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="optim=deepspeed_fused_adam is a CUDA kernel and this machine has no CUDA"):
        parse_args(["task=clm", "optim=deepspeed_fused_adam"])


def _deepspeed_accelerator(ds: dict, device: str = "cpu"):
    """What resolve_optim reads of an Accelerator under a DeepSpeed launch (the plugin's config)."""
    plugin = types.SimpleNamespace(deepspeed_config=ds)
    return types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), device=torch.device(device),
                                 is_main_process=True)


def _resolved(optim: str | None, ds: dict | None, device: str = "cpu") -> str | None:
    cfg = _cfg(optim)
    resolve_optim(cfg, _deepspeed_accelerator(ds, device) if ds is not None else None)
    return cfg.optim


def test_optim_follows_the_deepspeed_config(capsys):
    offload = lambda **extra: {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, **extra}
    assert _resolved(None, None) == "adamw_torch"
    assert _resolved(None, {"zero_optimization": {"stage": 2}}) == "adamw_torch"
    # Optimizer offload: DeepSpeed's CPU Adam, and accelerate told to keep it (it would otherwise
    # rebuild it as Adam with L2 decay and leave the scheduler on the discarded original).
    ds = offload()
    assert _resolved(None, ds) == "deepspeed_cpu_adam" and ds["zero_force_ds_cpu_optimizer"] is False
    ds = offload(zero_force_ds_cpu_optimizer=True)  # DeepSpeed's own check is met by its CPU Adam
    assert _resolved(None, ds) == "deepspeed_cpu_adam" and ds["zero_force_ds_cpu_optimizer"] is False
    # Another optim= runs its torch update on the CPU, and says so ...
    ds = offload()
    assert _resolved("sgd", ds) == "sgd" and ds["zero_force_ds_cpu_optimizer"] is False
    assert "notrainer: note: optim=sgd under ZeRO optimizer offload: its torch update runs on the CPU" in \
        capsys.readouterr().err
    # ... unless the config insists on DeepSpeed's CPU optimizers.
    with pytest.raises(UsageError, match="optim=sgd under ZeRO optimizer offload, but the DeepSpeed config says "
                                         "zero_force_ds_cpu_optimizer: true"):
        _resolved("sgd", offload(zero_force_ds_cpu_optimizer=True))
    with pytest.raises(UsageError, match="optim=deepspeed_fused_adam runs on GPU parameters, but the DeepSpeed "
                                         "config offloads the optimizer"):
        _resolved("deepspeed_fused_adam", offload())
    with pytest.raises(UsageError, match="optim=deepspeed_cpu_adam updates CPU parameters"):
        _resolved("deepspeed_cpu_adam", {"zero_optimization": {"stage": 2}}, device="cuda")
    # A config with its own optimizer section: that one is used, and an optim= key contradicts it.
    own = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    assert _resolved(None, own) is None
    with pytest.raises(UsageError, match=r"optim=deepspeed_cpu_adam but the DeepSpeed config defines its own "
                                         r"optimizer \(AdamW\); drop one of them"):
        _resolved("deepspeed_cpu_adam", own)


def test_weight_decay_groups_see_zero3_partitioned_shapes():
    """A parameter that ZeRO-3 partitioned at creation is an empty 1-d tensor with its real shape
    in ds_shape: a weight matrix still gets weight decay, a bias still does not."""
    model = torch.nn.Linear(4, 4)
    for name in ("weight", "bias"):
        full = getattr(model, name)
        part = torch.nn.Parameter(torch.empty(0))
        part.ds_shape = full.shape
        setattr(model, name, part)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [model.weight] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [model.bias] and no_decay["weight_decay"] == 0.0


@pytest.mark.slow
def test_optim_reaches_the_cli_run(tmp_path):
    """optim= and optim_args go from the command line to the optimizer the loop steps."""
    from conftest import run_cli

    common = ("task=clm", "max_train_steps=4", "max_train_samples=64", "max_eval_samples=16", "logging_steps=1000")
    sgd = run_cli(*common, "optim=sgd", "optim_args=momentum=0.9", "learning_rate=0.5", output_dir=tmp_path / "sgd")
    ada = run_cli(*common, "optim=adafactor", "learning_rate=1e-2", output_dir=tmp_path / "ada")
    assert sgd["global_step"] == ada["global_step"] == 4
    assert sgd["train_loss"] != ada["train_loss"]  # a different optimizer really ran
    assert all(torch.isfinite(torch.tensor(r["eval_perplexity"])) for r in (sgd, ada))


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adafactor", "sgd", *sorted(set(BITSANDBYTES) - {"adamw_bnb_8bit"})])
@pytest.mark.slow
def test_each_optimizer_resumes_bitwise(optim, tmp_path, capsys):
    """A run resumed from its step-2 checkpoint ends with the same weights, bit for bit, as the
    uninterrupted run: the optimizer's state (momentum, Adafactor's factored moments, bitsandbytes'
    8-bit state) goes through the checkpoint whole."""
    import shutil

    from safetensors.torch import load_file

    from conftest import one_thread, run_cli

    if optim in BITSANDBYTES:
        pytest.importorskip("bitsandbytes")
    extra = ["optim_args=momentum=0.9"] if optim == "sgd" else []
    args = ["task=clm", f"optim={optim}", *extra, "max_train_steps=4", "checkpointing_steps=2", "report_to=none",
            "max_train_samples=64", "max_eval_samples=16", "logging_steps=1000"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    with one_thread():
        run_cli(*args, output_dir=ref)
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
        capsys.readouterr()
        run_cli(*args, "resume_from_checkpoint=auto", output_dir=out)
    assert "(step 2, epoch 0)" in capsys.readouterr().out  # it resumed, not restarted
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), optim
