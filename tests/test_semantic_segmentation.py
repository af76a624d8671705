"""task=semantic_segmentation: the embedded default (generated shapes, a tiny SegFormer) learns
far past predicting all background, the export loads with AutoModelForSemanticSegmentation and
runs in pipeline("image-segmentation"), an images/ + masks/ pair folder trains, do_predict on a
plain folder writes a PNG mask per image at its size, bad input stops in one line, and kill -9
then resume_from_checkpoint=auto ends bitwise equal to an uninterrupted run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CPU_ENV, REPO, one_thread, read_results, run_cli
from dist_helpers import slow_task_source
from notrainer.errors import UsageError
from notrainer.tasks.semantic_segmentation import SHAPE_NAMES, shapes_example

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow

SHAPES = list(SHAPE_NAMES)  # background, circle, square, triangle


def all_background_mean_iou(masks) -> float:
    """eval_mean_iou of a model that predicts background (0) for every pixel: IoU of background is
    the background fraction, every shape present in the references has IoU 0."""
    arrays = [np.asarray(m) for m in masks]
    present = set(np.unique(np.concatenate([a.ravel() for a in arrays])).tolist())
    background = np.mean(np.concatenate([(a == 0).ravel() for a in arrays]))
    return float(background) / len(present)


def write_pair_folder(root: Path, n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    """root/images/shape_<i>.jpg with root/masks/shape_<i>.png (label ids 0..3), as a user's
    ADE20K-style folder would be. Returns the masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = []
    for i in range(n):
        image, mask = shapes_example(rng, size)
        image.save(root / "images" / f"shape_{i:04d}.jpg", quality=95)
        mask.save(root / "masks" / f"shape_{i:04d}.png")
        masks.append(np.asarray(mask))
    return masks


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default exactly as `python -m notrainer.run task=semantic_segmentation` runs
    it (800 generated images, 4 epochs = 200 steps; about 40 s on 2 CPU cores)."""
    out = tmp_path_factory.mktemp("seg") / "run"
    with one_thread():
        results = run_cli("task=semantic_segmentation", output_dir=out)
    return out, results


@pytest.fixture(scope="module")
def validation_masks():
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=semantic_segmentation"])
    raw = task_cls(cfg).load_raw_datasets()
    assert (len(raw["train"]), len(raw["validation"])) == (800, 160)
    return list(raw["validation"]["mask"])


def test_embedded_default_beats_all_background_by_far(default_run, validation_masks):
    out, results = default_run
    baseline = all_background_mean_iou(validation_masks)
    assert 0.15 < baseline < 0.3, baseline  # 4 labels, mostly background
    assert results == read_results(out)
    assert results["eval_samples"] == 160 and results["global_step"] == 200
    assert results["eval_mean_iou"] >= 0.7, results  # 0.90 measured
    assert results["eval_mean_iou"] >= baseline + 0.4
    assert results["eval_overall_accuracy"] >= 0.93
    for name in SHAPES:
        assert results[f"eval_iou_{name}"] >= 0.5, (name, results)
    assert 0 <= results["eval_mean_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(SHAPES)}
    assert config["model_type"] == "segformer"
    assert (out / "preprocessor_config.json").exists()


def test_export_loads_and_runs_in_the_image_segmentation_pipeline(default_run):
    from transformers import AutoModelForSemanticSegmentation, pipeline

    out, _ = default_run
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert model.config.num_labels == 4 and model.config.id2label[3] == "triangle"

    segment = pipeline("image-segmentation", model=str(out))
    rng = np.random.default_rng(123)
    agree = []
    for _ in range(6):
        image, mask = shapes_example(rng)
        answer = segment(image)
        labels = [a["label"] for a in answer]
        assert labels and set(labels) <= set(SHAPES) and len(set(labels)) == len(labels)
        predicted = np.zeros(mask.size[::-1], dtype=np.int64)
        for a in answer:
            assert a["mask"].size == image.size
            predicted[np.asarray(a["mask"]) > 0] = SHAPES.index(a["label"])
        agree.append(np.mean(predicted == np.asarray(mask)))
    assert np.mean(agree) >= 0.9, agree  # pixel accuracy of the pipeline's masks


def test_predictions_on_a_plain_folder_write_a_mask_per_image(default_run, tmp_path):
    """do_predict with the export on a folder of plain images (no masks), one of them not
    square: a PNG per image at the image's size, holding label ids, and one JSON line naming it."""
    out, _ = default_run
    rng = np.random.default_rng(7)
    folder = tmp_path / "plain"
    folder.mkdir()
    truth = {}
    for i in range(5):
        image, mask = shapes_example(rng)
        if i == 0:  # 64 wide, 48 high
            image, mask = image.crop((0, 0, 64, 48)), mask.crop((0, 0, 64, 48))
        image.save(folder / f"img_{i}.png")
        truth[f"img_{i}"] = (np.asarray(mask), image.size)
    pred_dir = tmp_path / "pred"
    with one_thread():
        run_cli("task=semantic_segmentation", "do_train=false", "do_predict=true", f"model_name_or_path={out}",
                f"test_file={folder}", output_dir=pred_dir)
    records = [json.loads(line) for line in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [str(folder / f"img_{i}.png") for i in range(5)]
    from PIL import Image

    agree = []
    for r in records:
        stem = Path(r["image"]).stem
        assert r["mask"] == f"predicted_masks/{stem}.png"
        with Image.open(pred_dir / r["mask"]) as png:
            assert png.size == truth[stem][1]
            values = np.asarray(png)
        assert set(np.unique(values).tolist()) <= {0, 1, 2, 3}
        agree.append(np.mean(values == truth[stem][0]))
    assert np.mean(agree) >= 0.85, agree


def test_a_pair_folder_trains(tmp_path):
    """images/*.jpg + masks/*.png with matching names; the labels come from the mask ids (0..3),
    the names from id2label= as a comma list."""
    train_masks = write_pair_folder(tmp_path / "train", 320, seed=1)
    val_masks = write_pair_folder(tmp_path / "val", 48, seed=2)
    baseline = all_background_mean_iou(val_masks)
    assert len(np.unique(np.concatenate([m.ravel() for m in train_masks]))) == 4
    out = tmp_path / "run"
    with one_thread():
        results = run_cli("task=semantic_segmentation", f"train_file={tmp_path / 'train'}",
                          f"validation_file={tmp_path / 'val'}", "max_train_steps=80", "image_size=64",
                          "id2label=bg,circle,square,triangle", output_dir=out)
    assert results["eval_samples"] == 48 and results["global_step"] == 80
    assert results["eval_mean_iou"] >= baseline + 0.25, (baseline, results)  # 0.7-0.8 measured
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "bg", "1": "circle", "2": "square", "3": "triangle"}


def test_labels_without_id2label_are_the_mask_ids(tmp_path):
    write_pair_folder(tmp_path / "train", 8, seed=3)
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=semantic_segmentation", f"train_file={tmp_path / 'train'}"])
    task = task_cls(cfg)
    raw = task.load_raw_datasets()
    assert task.label_names == ["0", "1", "2", "3"]
    ds = task.prepare_datasets(raw, task.build_processor(raw))
    batch = ds["train"][:2]
    assert batch["pixel_values"].shape == (2, 3, 64, 64)  # the tiny model's image_size (no model_name_or_path)
    assert batch["labels"].shape == (2, 64, 64) and batch["labels"].max() <= 3


# ---------------------------------------------------------------------- bad input: one line, nothing written


def _refused(tmp_path, *args) -> str:
    out = tmp_path / "out"
    with pytest.raises(UsageError) as e:
        run_cli("task=semantic_segmentation", *args, output_dir=out)
    assert not out.exists(), "nothing may be written for bad input"
    message = str(e.value)
    assert "\n" not in message
    return message


def _small_pairs(root: Path) -> Path:
    write_pair_folder(root, 6, seed=4)
    return root


def test_a_file_in_the_images_folder_that_is_not_an_image_is_refused(tmp_path):
    root = _small_pairs(tmp_path / "train")
    (root / "images" / "notes.jpg").write_text("not an image")
    (root / "masks" / "notes.png").write_bytes((root / "masks" / "shape_0000.png").read_bytes())
    assert "notes.jpg is not a readable image" in _refused(tmp_path, f"train_file={root}")


def test_a_mask_of_another_size_than_its_image_is_refused(tmp_path):
    from PIL import Image

    root = _small_pairs(tmp_path / "train")
    Image.new("L", (32, 40), 0).save(root / "masks" / "shape_0002.png")
    message = _refused(tmp_path, f"train_file={root}")
    assert "shape_0002.png: the mask is 32x40 but its image is 64x64" in message


def test_a_mask_value_outside_the_labels_is_refused(tmp_path):
    from PIL import Image

    root = _small_pairs(tmp_path / "train")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:20, 10:20] = 7
    Image.fromarray(mask, mode="L").save(root / "masks" / "shape_0001.png")
    message = _refused(tmp_path, f"train_file={root}", "id2label=background,circle,square,triangle")
    assert "shape_0001.png: mask value 7 is outside the 4 labels (0..3)" in message


def test_a_validation_mask_value_never_seen_in_training_is_refused(tmp_path):
    from PIL import Image

    train = tmp_path / "train"
    (train / "images").mkdir(parents=True)
    (train / "masks").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(train / "images" / f"a{i}.png")
        m = np.zeros((16, 16), dtype=np.uint8)
        m[:8] = 1
        Image.fromarray(m, mode="L").save(train / "masks" / f"a{i}.png")
    val = _small_pairs(tmp_path / "val")  # holds 2 and 3 as well
    message = _refused(tmp_path, f"train_file={train}", f"validation_file={val}")
    assert "is outside the 2 labels (0..1)" in message and "val/masks/" in message


def test_a_mask_with_colour_channels_is_refused(tmp_path):
    from PIL import Image

    root = _small_pairs(tmp_path / "train")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(root / "masks" / "shape_0003.png")
    assert "the mask has colour channels (mode RGB)" in _refused(tmp_path, f"train_file={root}")


def test_an_image_without_a_mask_is_refused(tmp_path):
    root = _small_pairs(tmp_path / "train")
    (root / "masks" / "shape_0005.png").unlink()
    assert "shape_0005.jpg has no mask in" in _refused(tmp_path, f"train_file={root}")


def test_the_cli_exits_non_zero_with_one_line(tmp_path):
    """Through the real entry point: a non-zero exit, the one line on stderr, no output_dir."""
    from PIL import Image

    root = _small_pairs(tmp_path / "train")
    Image.new("L", (64, 32), 0).save(root / "masks" / "shape_0000.png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=semantic_segmentation", f"train_file={root}",
                           f"output_dir={out}", "report_to=none"], capture_output=True, text=True, timeout=180,
                          cwd=str(REPO), env={**os.environ, **CPU_ENV})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("notrainer: error:")]
    assert errors == [f"notrainer: error: {root / 'masks' / 'shape_0000.png'}: the mask is 64x32 but its image is 64x64"]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_help_lists_the_task_keys():
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=semantic_segmentation", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0
    for name in ("image_column", "mask_column", "id2label", "reduce_labels", "ignore_index", "image_size",
                 "horizontal_flip", "crop_scale_min", "image_processor_name"):
        assert name in proc.stdout


# ---------------------------------------------------------------------- slow: kill -9

SLOW_TASK = slow_task_source("notrainer.tasks.semantic_segmentation", "SemanticSegmentationTask", "SlowSegmentation")
RESUME_ARGS = ["report_to=none", "max_train_steps=12", "checkpointing_steps=4", "per_device_train_batch_size=8",
               "max_train_samples=160", "max_eval_samples=32", "augment=true", "horizontal_flip=true",
               "gradient_accumulation_steps=2"]


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_equal(tmp_path, monkeypatch):
    """The same random crops and flips after the resume (torch's RNG is in the checkpoint): the
    weights and the metrics equal an uninterrupted run's to the bit, and the resumed run trains
    only the steps after step 4 (not all 12 again)."""
    from dist_helpers import kill9_past_checkpoint

    (tmp_path / "slow.py").write_text(SLOW_TASK)
    args = [f"task={tmp_path / 'slow.py'}:SlowSegmentation", *RESUME_ARGS]
    ref, out = tmp_path / "ref", tmp_path / "run"
    with one_thread():
        run_cli(*args, output_dir=ref)
    kill9_past_checkpoint(args, out, 4, tmp_path / "batches")  # between step 4's and step 8's checkpoints
    assert not (out / "checkpoints" / "step_8").exists() and not (out / "model.safetensors").exists()
    resumed = tmp_path / "resumed_batches"
    monkeypatch.setenv("SLOW_STEP_MARKER", str(resumed))
    monkeypatch.setenv("SLOW_STEP_SECONDS", "0")
    with one_thread():
        run_cli(*args, "resume_from_checkpoint=auto", output_dir=out)
    assert len(Path(f"{resumed}.0").read_text().splitlines()) == (12 - 4) * 2  # steps 5..12, 2 micro-batches each
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    got, want = read_results(out), read_results(ref)
    assert (got["eval_mean_iou"], got["train_loss"]) == (want["eval_mean_iou"], want["train_loss"])
