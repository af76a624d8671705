"""task=image_classification: real digit scans (scikit-learn's bundled 1,797) in an image folder
and as the embedded default, do_predict, the exported folder in pipeline("image-classification"),
one-line errors before training, kill -9 exact resume and 2-process DDP (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli_subprocess, one_thread, read_results, run_cli
from dist_helpers import slow_task_source
from notrainer.errors import UsageError

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow

SHORT = ["report_to=none", "num_train_epochs=2", "per_device_train_batch_size=32"]


def write_digit_folder(root: Path, start: int, stop: int, flat: bool = False) -> list[tuple[Path, int]]:
    """Digits start..stop as PNG files under root/<digit>/ (flat: all in root)."""
    from notrainer.tasks.image_classification import digits_images

    images, labels = digits_images()
    out = []
    for i in range(start, stop):
        folder = root if flat else root / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"digit_{i:04d}.png"
        images[i].save(path)
        out.append((path, labels[i]))
    return out


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digit_folder(root / "train", 0, 1400)
    write_digit_folder(root / "val", 1400, 1650)
    test = write_digit_folder(root / "test", 1650, 1797, flat=True)
    return root, test


@pytest.fixture(scope="module")
def trained(digit_folders, tmp_path_factory):
    """Two epochs on an image folder of real digits, then predictions for a flat folder."""
    root, test = digit_folders
    out = tmp_path_factory.mktemp("run")
    with one_thread():
        results = run_cli("task=image_classification", *SHORT, f"train_file={root / 'train'}",
                          f"validation_file={root / 'val'}", f"test_file={root / 'test'}", "do_predict=true",
                          output_dir=out)
    return out, results, test


def test_image_folder_of_real_digits_learns(trained):
    out, results, _ = trained
    assert results["eval_accuracy"] >= 0.85, results
    assert results["eval_top5_accuracy"] >= results["eval_accuracy"]
    assert read_results(out)["eval_samples"] == 250
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    assert (out / "preprocessor_config.json").exists()


def test_predictions_name_each_image_with_label_and_score(trained):
    out, _, test = trained
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [str(p) for p, _ in test]
    assert all(0 < r["score"] <= 1 for r in records)
    right = np.mean([r["label"] == str(y) for r, (_, y) in zip(records, test)])
    assert right >= 0.85


def test_export_runs_in_the_image_classification_pipeline(trained):
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    out, _, test = trained
    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 10
    clf = pipeline("image-classification", model=str(out))
    answers = clf([Image.open(p) for p, _ in test[:40]], top_k=1)
    right = np.mean([a[0]["label"] == str(y) for a, (_, y) in zip(answers, test[:40])])
    assert right >= 0.8


def test_csv_with_relative_paths_and_a_label_column(digit_folders, tmp_path):
    root, _ = digit_folders
    rows = ["file,digit"] + [f"{p.relative_to(root)},{p.parent.name}" for p in sorted((root / "val").rglob("*.png"))]
    (root / "val.csv").write_text("\n".join(rows) + "\n")
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=image_classification", f"train_file={root / 'val.csv'}", "label_column=digit"])
    task = task_cls(cfg)
    raw = task.load_raw_datasets()
    assert task.image_col == "file" and task.label_names == [str(i) for i in range(10)]
    ds = task.prepare_datasets(raw, task.build_processor(raw))
    batch = ds["train"][:4]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


def test_embedded_default_uses_the_real_digits():
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=image_classification"])
    raw = task_cls(cfg).load_raw_datasets()
    assert (len(raw["train"]), len(raw["validation"])) == (1500, 297)
    assert raw["train"].features["label"].names == [str(i) for i in range(10)]


def test_augmentation_only_at_training_time(digit_folders):
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=image_classification"])
    task = task_cls(cfg)
    raw = task.load_raw_datasets()
    ds = task.prepare_datasets(raw, task.build_processor(raw))
    assert not np.allclose(ds["train"][:8]["pixel_values"], ds["train"][:8]["pixel_values"])  # drawn anew
    assert np.allclose(ds["validation"][:8]["pixel_values"], ds["validation"][:8]["pixel_values"])


# ---------------------------------------------------------------------- bad input: one line, nothing written


def _refused(tmp_path, *args) -> str:
    out = tmp_path / "out"
    with pytest.raises(UsageError) as e:
        run_cli("task=image_classification", *args, output_dir=out)
    assert not out.exists(), "nothing may be written for bad input"
    message = str(e.value)
    assert "\n" not in message
    return message


def _small_folder(root: Path) -> Path:
    write_digit_folder(root, 0, 40)
    return root


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    root = _small_folder(tmp_path / "imgs")
    (root / "3" / "notes.jpg").write_text("not an image")
    assert "notes.jpg is not a readable image" in _refused(tmp_path, f"train_file={root}")


def test_an_empty_class_folder_is_refused(tmp_path):
    root = _small_folder(tmp_path / "imgs")
    (root / "ten").mkdir()
    assert "class folder 'ten' is empty" in _refused(tmp_path, f"train_file={root}")


def test_a_missing_image_file_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    data = tmp_path / "train.jsonl"
    data.write_text('{"image": "missing.png", "label": "a"}\n{"image": "b.png", "label": "b"}\n')
    assert "missing.png does not exist" in _refused(tmp_path, f"train_file={data}")


def test_a_label_out_of_range_is_refused(tmp_path):
    paths = write_digit_folder(tmp_path / "imgs", 0, 6, flat=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "label": i % 3}) + "\n" for i, (p, _) in enumerate(paths)))
    message = _refused(tmp_path, f"train_file={data}", "id2label=zero,one", "validation_split_percentage=0")
    assert "label 2 in row 2 of the train data is out of range" in message


def test_missing_pillow_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert "pip install 'notrainer[vision]'" in _refused(tmp_path)


def test_help_lists_the_task_keys():
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=image_classification", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0
    for name in ("image_column", "label_column", "augment", "horizontal_flip", "id2label", "image_processor_name"):
        assert name in proc.stdout


# ---------------------------------------------------------------------- slow: kill -9 and DDP

SLOW_TASK = slow_task_source("notrainer.tasks.image_classification", "ImageClassificationTask", "SlowImages")
RESUME_ARGS = ["report_to=none", "max_train_steps=12", "checkpointing_steps=4", "per_device_train_batch_size=16",
               "max_train_samples=400", "max_eval_samples=64", "horizontal_flip=true", "gradient_accumulation_steps=2"]


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_equal(tmp_path):
    from dist_helpers import kill9_past_checkpoint

    (tmp_path / "slow.py").write_text(SLOW_TASK)
    args = [f"task={tmp_path / 'slow.py'}:SlowImages", *RESUME_ARGS]
    ref, out = tmp_path / "ref", tmp_path / "run"
    with one_thread():
        run_cli(*args, output_dir=ref)
    kill9_past_checkpoint(args, out, 4, tmp_path / "batches")  # between step 4's and step 8's checkpoints
    assert not (out / "checkpoints" / "step_8").exists() and not (out / "model.safetensors").exists()
    with one_thread():
        run_cli(*args, "resume_from_checkpoint=auto", output_dir=out)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    got, want = read_results(out), read_results(ref)
    assert (got["eval_accuracy"], got["train_loss"]) == (want["eval_accuracy"], want["train_loss"])


@pytest.mark.slow
def test_two_process_ddp_trains_and_counts_each_image_once(tmp_path):
    out = tmp_path / "ddp"
    cli_subprocess("task=image_classification", "report_to=none", "num_train_epochs=2", "per_device_train_batch_size=16",
                   "per_device_eval_batch_size=40", f"output_dir={out}", num_processes=2, timeout=900)
    results = read_results(out)
    assert results["eval_samples"] == 297  # the uneven last batch is not counted twice
    assert results["eval_accuracy"] >= 0.85
    assert results["global_step"] == 2 * 47  # 1,500 images / (2 x 16) per step
