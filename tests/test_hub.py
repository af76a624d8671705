"""push_to_hub: refused in one line before training when it cannot work; what would be uploaded."""

from __future__ import annotations

import fnmatch
from types import SimpleNamespace

import pytest

from notrainer.observability import hub
from notrainer.errors import UsageError


def _cfg(**kw):
    base = dict(push_to_hub=True, hub_model_id=None, hub_private_repo=None, hub_token=None, hub_strategy="end",
                output_dir="runs/my-model")
    base.update(kw)
    return SimpleNamespace(**base)


def test_off_means_nothing_is_checked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.check_push_to_hub(_cfg(push_to_hub=False)) is None
    assert hub.check_push_to_hub(SimpleNamespace()) is None  # a config without the keys


def test_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(UsageError) as e:
        hub.check_push_to_hub(_cfg(hub_model_id="me/model"))
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_transformers_offline_alone_is_refused_naming_it(monkeypatch):
    """TRANSFORMERS_OFFLINE=1 (what many offline users set) also means no Hub: refused before
    training, naming the variable that is set."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(UsageError) as e:
        hub.check_push_to_hub(_cfg(hub_model_id="me/model"))
    assert str(e.value).startswith("push_to_hub=true needs the network, but TRANSFORMERS_OFFLINE is set")


def test_no_token_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UsageError, match="needs a Hugging Face token") as e:
        hub.check_push_to_hub(_cfg())
    assert "\n" not in str(e.value)


def test_token_is_checked_before_training(monkeypatch):
    """With a token, the Hub is asked once (whoami); a refusal is one line, not a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # online, whatever the caller's environment
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def refuse(token=None):
        raise RuntimeError("401 Client Error: Unauthorized\nmore details")

    monkeypatch.setattr("huggingface_hub.whoami", refuse)
    with pytest.raises(UsageError) as e:
        hub.check_push_to_hub(_cfg(hub_token="hf_bad"))
    assert str(e.value) == "push_to_hub=true: cannot reach the Hub with this token: 401 Client Error: Unauthorized"
    monkeypatch.setattr("huggingface_hub.whoami", lambda token=None: {"name": "me"})
    assert hub.check_push_to_hub(_cfg(hub_token="hf_ok")) == "my-model"  # default: the run folder's name


def test_bad_repo_id_and_strategy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="not a valid Hub repo id"):
        hub.check_push_to_hub(_cfg(hub_model_id="a/b/c"))
    with pytest.raises(UsageError, match="hub_strategy must be one of end, every_save"):
        hub.check_push_to_hub(_cfg(hub_strategy="sometimes"))


def _uploaded(files, strategy):
    ignore = hub._ignore_patterns(strategy)
    return [f for f in files if not any(fnmatch.fnmatch(f, p) for p in ignore)]


def test_what_is_uploaded_per_strategy():
    files = ["model.safetensors", "config.json", "README.md", "report.html", "plots/train_loss.png",
             "checkpoints/step_10/model.safetensors", "checkpoints/.tmp-step_20/x", "logs/mlflow.db",
             "log_history.jsonl", "README.md.tmp"]
    end = _uploaded(files, "end")
    assert end == ["model.safetensors", "config.json", "README.md", "report.html", "plots/train_loss.png",
                   "log_history.jsonl"]
    assert "checkpoints/step_10/model.safetensors" in _uploaded(files, "all_checkpoints")
    assert "checkpoints/.tmp-step_20/x" not in _uploaded(files, "all_checkpoints")
