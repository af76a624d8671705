"""task=reward and the preference data it shares with task=dpo: layouts, truncation, bad pairs,
the embedded default (pairwise accuracy on held-out pairs), the export's scoring snippet, LoRA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, read_results, run_cli
from notrainer.errors import UsageError
from notrainer.tasks.preference import truncate_pair

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_truncation_rule():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103], [200, 201]
    # the prompt keeps its last 4 tokens; each response its first max_length - 4
    assert truncate_pair(prompt, chosen, rejected, max_len=7, max_prompt=4) == ([6, 7, 8, 9], [100, 101, 102], [200, 201])
    assert truncate_pair([1, 2], chosen, rejected, max_len=4, max_prompt=3) == ([1, 2], [100, 101], [200, 201])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "run"
    return out, run_cli("task=reward", output_dir=out)


def test_default_learns_the_rule(default_run):
    out, _ = default_run
    res = read_results(out)
    assert res["eval_accuracy"] >= 0.9, res  # pairwise accuracy on held-out pairs
    assert res["eval_margin"] > 0


def test_export_scores_with_the_documented_snippet(default_run):
    out, _ = default_run
    # The two lines of docs/preference.md, in a fresh process.
    code = f'''
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model, tok = AutoModelForSequenceClassification.from_pretrained({str(out)!r}), AutoTokenizer.from_pretrained({str(out)!r})
score = lambda text: model(**tok(text + tok.eos_token, return_tensors="pt")).logits[0, 0].item()
print(score("describe the harbor . the harbor is lovely ."), score("describe the harbor . the harbor is gloomy ."))
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    good, bad = map(float, proc.stdout.split()[-2:])
    assert good > bad


def test_conversational_pairs_with_margin(tmp_path):
    """Message lists without a prompt column: the shared first messages are the prompt."""
    from notrainer.tasks.preference import builtin_preferences

    train, val = builtin_preferences(n_train=200, n_eval=40)

    def chat(r, margin=None):
        user = {"role": "user", "content": r["prompt"].strip()}
        row = {"chosen": [user, {"role": "assistant", "content": r["chosen"]}],
               "rejected": [user, {"role": "assistant", "content": r["rejected"]}]}
        if margin is not None:
            row["margin"] = margin
        return row

    tr = write_jsonl(tmp_path / "train.jsonl", [chat(r, 0.5) for r in train])
    va = write_jsonl(tmp_path / "val.jsonl", [chat(r, 0.0) for r in val])
    res = run_cli("task=reward", f"train_file={tr}", f"validation_file={va}", "num_train_epochs=3",
                  output_dir=tmp_path / "run")
    assert res["eval_accuracy"] >= 0.9, res


def test_identical_pair_is_one_line_naming_the_row(tmp_path):
    rows = [{"prompt": "say it .", "chosen": "yes .", "rejected": "no ."}] * 5
    rows.insert(3, {"prompt": "say it .", "chosen": "same .", "rejected": "same ."})
    tr = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=reward", f"train_file={tr}",
                           "validation_split_percentage=0", f"output_dir={out}", "report_to=none"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("notrainer: error: train row 3: chosen and rejected are identical"), last
    assert not out.exists()


def test_truncated_pair_and_drop_with_count(tmp_path, capsys):
    long_prompt = "tell me about the river " * 10
    rows = [{"prompt": "describe the city . ", "chosen": "the city is good .", "rejected": "the city is bad ."}] * 30
    rows[7] = {"prompt": long_prompt, "chosen": "the city is good .", "rejected": "the city is bad ."}
    rows[9] = {"prompt": "a", "chosen": "same", "rejected": "same"}
    tr = write_jsonl(tmp_path / "train.jsonl", rows)
    args = ["task=reward", f"train_file={tr}", "validation_split_percentage=0", "max_length=24",
            "max_prompt_length=24", "do_eval=false", "max_train_steps=2"]
    with pytest.raises(UsageError, match="max_prompt_length=24 leaves no room"):
        run_cli(*args, output_dir=tmp_path / "a")
    args[-4:-2] = ["max_length=24", "max_prompt_length=23"]
    # the prompt keeps its last 23 tokens: one response token is left, "the" in both responses
    with pytest.raises(UsageError, match=r"train row 7: chosen and rejected are identical after truncation "
                                         r"\(max_prompt_length=23, max_length=24\)"):
        run_cli(*args, output_dir=tmp_path / "b")
    run_cli(*args, "drop_invalid_pairs=true", output_dir=tmp_path / "c")
    printed = capsys.readouterr().out
    assert "train: dropped 2 of 30 pairs: 1 chosen and rejected are identical, " \
           "1 chosen and rejected are identical after truncation" in printed, printed


def test_lora_reward_model(tmp_path):
    res = run_cli("task=reward", "lora.r=8", "learning_rate=5e-3", "num_train_epochs=2", output_dir=tmp_path / "run")
    assert res["eval_accuracy"] >= 0.9, res
    assert (tmp_path / "run" / "adapter_config.json").exists()
