"""One source of truth for the settings two places could give: mixed precision (the key vs the
launch file / accelerate config) and gradient clipping (max_grad_norm vs DeepSpeed's
gradient_clipping)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from conftest import one_thread, run_cli
from notrainer.errors import UsageError


def _ds_acc(config: dict):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def test_max_grad_norm_fills_deepspeed_gradient_clipping():
    from notrainer.engine.loop import _fill_deepspeed_clipping

    for given in ({}, {"gradient_clipping": "auto"}):
        acc = _ds_acc(dict(given))
        _fill_deepspeed_clipping(acc, 0.0)  # 0 = no clipping, written as such (the plugin would drop it)
        assert acc.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0
    acc = _ds_acc({"gradient_clipping": 0.5})
    _fill_deepspeed_clipping(acc, 0.5)  # the same value twice is no conflict
    with pytest.raises(UsageError, match="gradient_clipping=1.0 but max_grad_norm=0.5"):
        _fill_deepspeed_clipping(_ds_acc({"gradient_clipping": 1.0}), 0.5)


def test_an_explicit_mixed_precision_that_contradicts_the_launch_file_is_refused(monkeypatch):
    from notrainer.cli.run import settle_mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    for key in ("fp16", "no"):
        with pytest.raises(UsageError, match=f"mixed_precision={key} but the launch file"):
            settle_mixed_precision(SimpleNamespace(mixed_precision=key), SimpleNamespace(mixed_precision="bf16"))
    cfg = SimpleNamespace(mixed_precision=None)
    settle_mixed_precision(cfg, SimpleNamespace(mixed_precision="bf16"))
    assert cfg.mixed_precision == "bf16"
    # "no" from a launcher that was given nothing says nothing: the key decides
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    cfg = SimpleNamespace(mixed_precision="bf16")
    settle_mixed_precision(cfg, SimpleNamespace(mixed_precision="bf16"))
    assert cfg.mixed_precision == "bf16"


def test_the_launch_files_precision_reaches_config_yaml(monkeypatch, tmp_path):
    # What `accelerate launch` with `mixed_precision: bf16` in the launch file sets.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with one_thread():
        run_cli("task=clm", "report_to=none", "max_train_steps=1", "do_eval=false", "per_device_train_batch_size=2",
                output_dir=tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["mixed_precision"] == "bf16"
