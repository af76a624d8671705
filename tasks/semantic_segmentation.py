"""Semantic segmentation: a label per pixel (`AutoModelForSemanticSegmentation`).

    accelerate launch -m notrainer.run task=semantic_segmentation model_name_or_path=nvidia/mit-b0 \
        train_file=data/train validation_file=data/val id2label=id2label.json

Data (see docs/semantic-segmentation.md):
- a folder with `images/` and `masks/` (or `annotations/`, `labels/`) subfolders whose files
  match by name (ADE20K style: `images/x.jpg` with `masks/x.png`);
- a csv/jsonl with an image path column and a mask path column (`image_column`, `mask_column`);
- a Hub dataset with `image` and `annotation` (or `label`) columns.
A mask is a single-channel image of label ids, the size of its image. `reduce_labels=true`
makes 0 (background) 255 and moves every other id down by one (ADE20K); pixels equal to
`ignore_index` (default 255) count in neither the loss nor the metrics. The label names come
from `id2label=` (a json file, inline json or a comma list), else the ids seen in the training
masks; they go into the exported config.

Images and masks stay files; each batch is decoded and, at training time, both get the same
random resized crop and horizontal flip (torch's RNG, so resume is exact), then the image goes
through the model's image processor (PIL backend) and the mask is resized to the same size
(nearest). The logits (a quarter of that size for SegFormer) are upsampled to the mask size
before the loss and the metrics. Metrics, with the definitions of evaluate's `mean_iou`
(notrainer/metrics/mean_iou.py): eval_mean_iou, eval_mean_accuracy, eval_overall_accuracy and
eval_iou_<label> per category, from a confusion matrix summed per batch (each example's counts
are gathered across ranks, not its mask). do_predict writes a PNG mask per image (at the
image's size) under output_dir/predicted_masks/ and one JSON line per image naming it.

The embedded default: generated coloured shapes (circles, squares, triangles) on textured
backgrounds, with their masks, on a tiny SegFormer built from a config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notrainer.config import key
from notrainer.data import files as data
from notrainer.errors import UsageError, check

from .base import Task
from .image_classification import IMAGE_CANDIDATES, tiny_vision_config
from . import vision

MASK_CANDIDATES = ("mask", "annotation", "label", "labels", "segmentation", "seg", "mask_path", "annotation_path")
PREDICTED_MASKS = "predicted_masks"


@dataclass
class SemanticSegmentationConfig(vision.VisionConfig):
    mask_column: Optional[str] = key(None, "column with the mask (or its path) (default: mask, annotation, label)")
    reduce_labels: bool = key(False, "mask value 0 (background) becomes ignore_index 255 and every other id goes down by one")
    ignore_index: int = key(255, "mask value that counts in neither the loss nor the metrics")
    # Segmentation's own defaults for two shared keys.
    image_size: int = key(512, "side of the square images of the built-in image processor (ignored with a model's processor)")
    crop_scale_min: float = key(0.25, "with augment: smallest area fraction of a random resized crop")

    min_image_size = 16

    def validate(self) -> None:
        super().validate()
        check(self.ignore_index >= 0, f"ignore_index must be >= 0, got {self.ignore_index}")


class SemanticSegmentationTask(Task):
    name = "semantic_segmentation"
    Config = SemanticSegmentationConfig
    auto_model = "AutoModelForSemanticSegmentation"
    tiny_model_type = "segformer"
    has_text = False
    embedded_defaults = dict(learning_rate=5e-3, num_train_epochs=4.0, per_device_train_batch_size=16,
                             per_device_eval_batch_size=32, image_size=64, crop_scale_min=0.5,
                             warmup_ratio=0.05, weight_decay=0.01)

    # Settled by load_raw_datasets (lifecycle step 2): the head follows from them.
    #: the image and mask columns (mask None: prediction data without masks)
    image_col: str = "image"
    mask_col: Optional[str] = None
    #: label names in id order
    label_names: list[str] = []
    #: the test split's image paths (prediction records and PNG names follow them), else None
    _test_paths: Optional[list] = None
    #: whether the data is the built-in shapes (their label names are known)
    _builtin: bool = False

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        self._builtin = True
        return builtin_shapes()

    def load_raw_datasets(self):
        vision.require_pillow(self.name)
        cfg = self.cfg
        raw, _ = vision.load_folders(cfg, vision.is_pair_folder, vision.pair_folder, super().load_raw_datasets)
        self.image_col, self.mask_col = self.find_columns(raw)
        raw = self.decode_paths(raw)
        self.find_labels(raw)
        return raw

    def find_columns(self, raw) -> tuple[str, Optional[str]]:
        cfg = self.cfg
        ref = raw["train"] if "train" in raw else next(iter(raw.values()))
        names = ref.column_names
        image = cfg.image_column or next((c for c in IMAGE_CANDIDATES if c in names), None)
        check(image is not None, f"no image column found (columns: {', '.join(names)}); set image_column=...")
        mask = cfg.mask_column or next((c for c in MASK_CANDIDATES if c in names and c != image), None)
        if mask is None and ("train" in raw or "validation" in raw):
            raise UsageError(f"no mask column found (columns: {', '.join(names)}); set mask_column=...")
        for split_name, split in raw.items():
            data.require_columns(split, {"image_column": image})
            if split_name != "test":
                data.require_columns(split, {"mask_column": mask})
        return image, mask

    def decode_paths(self, raw):
        """Path columns become datasets `Image` columns (still files, decoded per batch); each
        image and mask is opened now: a missing or unreadable file, or a mask of another size
        than its image, fails before training."""
        import datasets

        out = {}
        for split, ds in raw.items():
            src = vision.source_file(self.cfg, split)
            cols = [c for c in (self.image_col, self.mask_col) if c and c in ds.column_names]
            for col in cols:
                if isinstance(ds.features[col], datasets.Image):
                    continue
                paths = vision.resolve_paths(ds[col], src, col) if src else list(ds[col])
                if split == "test" and col == self.image_col:
                    self._test_paths = list(paths)
                ds = vision.as_image_column(ds, col, paths)
            out[split] = ds
        return datasets.DatasetDict(out)

    def find_labels(self, raw) -> None:
        """Reads every training and validation mask once: its size against its image, and its
        values against the labels."""
        cfg = self.cfg
        given = vision.parse_id2label(cfg.id2label)
        if given is None and self._builtin:
            given = list(SHAPE_NAMES)
        if "train" not in raw and given is None:
            config = self.pretrained_config("labels")
            self.label_names = [config.id2label[i] for i in range(config.num_labels)]
        seen: dict[str, set] = {}
        for split in ("train", "validation"):
            if split in raw and self.mask_col in raw[split].column_names:
                seen[split] = self.scan_masks(raw[split], split)
        if given is not None:
            self.label_names = given
        elif "train" in seen:
            check(bool(seen["train"]), "the training masks hold no label (every pixel is ignore_index)")
            self.label_names = [str(i) for i in range(max(seen["train"]) + 1)]
        n = len(self.label_names)
        check(n >= 2 or given is not None, f"the masks hold a single label ({self.label_names}); segmentation needs two")
        for split, values in seen.items():
            for v, where in values.items():
                check(v < n, f"{where}: mask value {v + (1 if cfg.reduce_labels else 0)} is outside the {n} labels "
                             f"(0..{n - 1}{', after reduce_labels' if cfg.reduce_labels else ''}) and is not "
                             f"ignore_index={cfg.ignore_index}; give id2label=... with every label, or fix the mask")

    def scan_masks(self, ds, split: str) -> dict:
        """{label id (after reduce_labels): where it was first seen}; a mask whose size differs
        from its image, or that has colour channels, is refused."""
        import datasets

        raw_view = ds.cast_column(self.image_col, datasets.Image(decode=False)) \
            if isinstance(ds.features[self.image_col], datasets.Image) else ds
        raw_view = raw_view.cast_column(self.mask_col, datasets.Image(decode=False)) \
            if isinstance(ds.features[self.mask_col], datasets.Image) else raw_view
        from PIL import Image
        import io

        def open_(x):
            if isinstance(x, dict):
                return Image.open(x["path"]) if x.get("bytes") is None else Image.open(io.BytesIO(x["bytes"]))
            return x

        found: dict = {}
        images, masks = raw_view[self.image_col], raw_view[self.mask_col]
        for i, (im_ref, mask_ref) in enumerate(zip(images, masks)):
            mask = open_(mask_ref)
            name = (mask_ref.get("path") if isinstance(mask_ref, dict) else None) or f"row {i} of the {split} data"
            image_size = open_(im_ref).size
            check(mask.size == image_size, f"{name}: the mask is {mask.size[0]}x{mask.size[1]} but its image is "
                                           f"{image_size[0]}x{image_size[1]}")
            check(mask.mode in ("L", "P", "I", "I;16", "1"),
                  f"{name}: the mask has colour channels (mode {mask.mode}); a mask holds one label id per pixel")
            for v in np.unique(self.mask_ids(np.asarray(mask))).tolist():
                if v != self.cfg.ignore_index:
                    found.setdefault(int(v), name)
        return found

    def mask_ids(self, mask: np.ndarray) -> np.ndarray:
        """A mask's label ids: with reduce_labels, 0 becomes ignore_index, 255 stays 255 and every
        other value goes down by one (as the Hugging Face image processors reduce them)."""
        ids = mask.astype(np.int64)
        if self.cfg.reduce_labels:
            out = ids - 1
            out[ids == 0] = self.cfg.ignore_index
            out[ids == 255] = 255
            ids = out
        return ids

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    # ------------------------------------------------------------------ processor and model

    def build_processor(self, raw):
        def default():
            from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

            s = self.cfg.image_size
            return SegformerImageProcessorPil(size={"height": s, "width": s})

        processor = vision.build_image_processor(self.cfg, default)
        if getattr(processor, "do_reduce_labels", False):  # reduce_labels is this task's key; the masks never reach it
            processor.do_reduce_labels = False
        return processor

    def model_kwargs(self, processor) -> dict:
        return dict(num_labels=self.num_labels, id2label=dict(enumerate(self.label_names)),
                    label2id={n: i for i, n in enumerate(self.label_names)},
                    semantic_loss_ignore_index=self.cfg.ignore_index)

    def tiny_config(self, processor):
        return tiny_vision_config(self.tiny_model_type, **self.model_kwargs(processor))

    # ------------------------------------------------------------------ batches

    def prepare_datasets(self, raw, processor):
        import datasets

        out = {}
        for split, ds in raw.items():
            cols = [self.image_col] + ([self.mask_col] if split != "test" and self.mask_col in ds.column_names else [])
            keep = ds.select_columns(cols)
            keep = keep.rename_columns({c: n for c, n in zip(cols, ("image", "mask")) if c != n})
            out[split] = keep.with_transform(self.transform(processor, train=split == "train"))
        return datasets.DatasetDict(out)

    def transform(self, processor, train: bool):
        from PIL import Image

        cfg = self.cfg
        size = vision.target_size(processor)
        augment = train and cfg.augment

        def apply(batch):
            images = [vision.as_rgb(im) for im in batch["image"]]
            masks = batch.get("mask")
            if augment:
                pairs = [vision.augment(im, size, (cfg.crop_scale_min, 1.0), cfg.horizontal_flip, mask=m)
                         for im, m in zip(images, masks or [None] * len(images))]
                images = [p[0] for p in pairs]
                masks = [p[1] for p in pairs] if masks is not None else None
            out = {"pixel_values": processor(images, return_tensors="pt")["pixel_values"]}
            if masks is not None:
                h, w = out["pixel_values"].shape[-2:]
                out["labels"] = torch.stack([torch.from_numpy(self.mask_ids(np.asarray(
                    m if m.size == (w, h) else m.resize((w, h), Image.Resampling.NEAREST)))) for m in masks])
            return out

        return apply

    def collator(self, processor):
        from transformers import default_data_collator

        return default_data_collator

    # ------------------------------------------------------------------ loss and evaluation

    def _logits(self, model, batch):
        """The logits upsampled (bilinear) to the mask size: (batch, labels, height, width)."""
        logits = model(pixel_values=batch["pixel_values"]).logits
        size = batch["labels"].shape[-2:] if "labels" in batch else batch["pixel_values"].shape[-2:]
        return torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    def loss(self, model, batch):
        logits = self._logits(model, batch)
        labels = batch["labels"]
        total = torch.nn.functional.cross_entropy(logits, labels, ignore_index=self.cfg.ignore_index, reduction="sum")
        return total / self.num_items(batch).clamp(min=1)

    def num_items(self, batch):
        """Labelled pixels (the loss is a mean over them)."""
        return (batch["labels"] != self.cfg.ignore_index).sum()

    def num_tokens(self, batch):
        return 0

    def eval_step(self, model, batch):
        logits = self._logits(model, batch)
        preds = logits.argmax(1)
        if "labels" not in batch:
            return {"mask": preds}
        labels = batch["labels"]
        valid = labels != self.cfg.ignore_index
        pixel_loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=self.cfg.ignore_index, reduction="none")
        n = self.num_labels
        # each example's confusion counts (reference x prediction), summed in compute_metrics
        flat = torch.where(valid, labels * n + preds, torch.full_like(labels, n * n)).flatten(1)
        confusion = torch.zeros(flat.shape[0], n * n + 1, dtype=torch.int64, device=flat.device)
        confusion.scatter_add_(1, flat, torch.ones_like(flat))
        return {"loss": pixel_loss.flatten(1).sum(1), "num_items": valid.flatten(1).sum(1).float(),
                "confusion": confusion[:, :-1]}

    def compute_metrics(self, outputs, eval_loss):
        from notrainer.metrics.mean_iou import scores

        if "confusion" not in outputs:
            return {}
        n = self.num_labels
        total = sum(c.astype(np.int64).sum(0) for c in outputs["confusion"]).reshape(n, n)
        result = scores(total)
        out = {k: result[k] for k in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        for name, iou in zip(self.label_names, result["per_category_iou"]):
            if np.isfinite(iou):  # a category in neither the references nor the predictions has no IoU
                out[f"iou_{name}"] = float(iou)
        return out

    # ------------------------------------------------------------------ prediction mode

    def predict_step(self, model, batch):
        logits = self._logits(model, {"pixel_values": batch["pixel_values"]})
        return {"mask": logits.argmax(1).to(torch.int32)}

    def format_predictions(self, outputs, dataset) -> list[dict]:
        """One PNG per image, at the image's size (nearest), under output_dir/predicted_masks/,
        holding the mask values of the data (reduce_labels undone)."""
        from PIL import Image

        from notrainer.engine.processes import is_rank0

        masks = np.concatenate(outputs["mask"])
        paths = self._test_paths or [None] * len(masks)
        folder = os.path.join(self.cfg.output_dir, PREDICTED_MASKS)
        sizes = dataset.with_transform(None)["image"] if paths[0] is None else None
        records, names = [], set()
        for i, mask in enumerate(masks):
            values = mask.astype(np.int64) + (1 if self.cfg.reduce_labels else 0)
            mode = "L" if values.max(initial=0) < 256 else "I"
            png = Image.fromarray(values.astype(np.uint8 if mode == "L" else np.int32), mode=mode)
            if paths[i] is not None:
                with Image.open(paths[i]) as im:
                    size = im.size
                stem = os.path.splitext(os.path.basename(paths[i]))[0]
            else:
                size, stem = sizes[i].size, f"{i:06d}"
            name = stem if stem not in names else f"{stem}_{i}"
            names.add(name)
            if is_rank0():
                os.makedirs(folder, exist_ok=True)
                png.resize(size, Image.Resampling.NEAREST).save(os.path.join(folder, f"{name}.png"))
            record = {"mask": os.path.join(PREDICTED_MASKS, f"{name}.png")}
            records.append({"image": paths[i], **record} if paths[i] is not None else record)
        return records


# ---------------------------------------------------------------------- built-in data

SHAPE_NAMES = ("background", "circle", "square", "triangle")
SHAPE_COLOURS = {1: (220, 60, 50), 2: (60, 190, 70), 3: (60, 90, 220)}  # circle, square, triangle


def shapes_example(rng: np.random.Generator, size: int = 64):
    """One image of 1-3 coloured shapes (circle, square, triangle; colour jittered) on a
    textured background (noise, stripes, a grey level), and its mask (0 = background)."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size]
    period, angle, base = rng.uniform(4, 12), rng.uniform(0, np.pi), rng.uniform(70, 180)
    stripes = 25 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    bg = base + stripes[..., None] + rng.normal(0, 18, (size, size, 3)) + rng.uniform(-25, 25, 3)
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), mode="RGB")
    mask = Image.new("L", (size, size), 0)
    draw_i, draw_m = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, 4))
        r = int(rng.integers(size // 10, size // 4))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in SHAPE_COLOURS[label])
        if label == 1:
            box = [cx - r, cy - r, cx + r, cy + r]
            draw_i.ellipse(box, fill=colour)
            draw_m.ellipse(box, fill=label)
        elif label == 2:
            box = [cx - r, cy - r, cx + r, cy + r]
            draw_i.rectangle(box, fill=colour)
            draw_m.rectangle(box, fill=label)
        else:
            pts = [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
            draw_i.polygon(pts, fill=colour)
            draw_m.polygon(pts, fill=label)
    return image, mask


def builtin_shapes(n_train: int = 800, n_validation: int = 160, size: int = 64, seed: int = 0):
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})

    def part(n):
        rows = [shapes_example(rng, size) for _ in range(n)]
        return datasets.Dataset.from_dict({"image": [r[0] for r in rows], "mask": [r[1] for r in rows]}, features=features)

    return datasets.DatasetDict(train=part(n_train), validation=part(n_validation))
