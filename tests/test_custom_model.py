"""The custom PreTrainedModel example (examples/custom_model) trains with task=clm, saves, reloads."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from notrainer.errors import UsageError

from conftest import REPO, run_cli

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow

SPEC = "examples/custom_model/modeling_tiny_lm.py:TinyLMForCausalLM"
FAST = ("max_eval_samples=16", "logging_steps=1000")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("custom") / "run"
    results = run_cli("task=clm", f"model_class={REPO / SPEC}", "max_train_steps=20", *FAST, output_dir=out)
    return out, results


def _module():
    from notrainer.imports import import_object

    return sys.modules[import_object(f"{REPO / SPEC}", "model_class").__module__]


def test_custom_model_trains_saves_and_reloads(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, results = trained
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tiny-lm" and config["architectures"] == ["TinyLMForCausalLM"]
    vocab = config["vocab_size"]
    assert results["eval_loss"] < 0.6 * math.log(vocab)  # random init starts at about ln(vocab)

    mod = _module()
    direct = mod.TinyLMForCausalLM.from_pretrained(out).eval()
    auto = AutoModelForCausalLM.from_pretrained(out).eval()  # the registered model_type
    assert type(auto).__name__ == "TinyLMForCausalLM"
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["the big dog sees the cat in the garden . we count one two three four ."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = direct(input_ids=ids, labels=ids), auto(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    assert a.loss.item() < 0.75 * math.log(vocab)  # the trained weights came back (a fresh init: ~ln(vocab))


def test_reload_in_a_fresh_process_with_trust_remote_code(trained):
    out, _ = trained
    assert (out / "modeling_tiny_lm.py").is_file()  # register_for_auto_class copied the code
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "print(type(m).__name__, m.config.model_type)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(out.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "TinyLMForCausalLM tiny-lm"


def test_registered_model_type_by_name(tmp_path):
    _module()  # importing the module registers "tiny-lm"
    res = run_cli("task=clm", "model_class=tiny-lm", "max_train_steps=2", *FAST, output_dir=tmp_path)
    assert res["global_step"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "tiny-lm"


@pytest.mark.parametrize("spec, match", [
    (f"{SPEC.split(':')[0]}:NoSuchClass", "has no 'NoSuchClass'"),
    ("no-such-model-type", "could not be built"),
])
def test_bad_model_class(tmp_path, spec, match):
    with pytest.raises(UsageError, match=match):
        run_cli("task=clm", f"model_class={spec}", *FAST, output_dir=tmp_path)
