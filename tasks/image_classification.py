"""Image classification: an image -> one of N labels (`AutoModelForImageClassification`).

    accelerate launch -m notrainer.run task=image_classification model_name_or_path=google/vit-base-patch16-224-in21k \
        train_file=images/train validation_file=images/val

Data (see docs/image-classification.md):
- an image folder, one subfolder per class (`root/<label>/<image>`), as datasets' imagefolder reads it;
- a csv/jsonl with an image path column (relative paths are read from the file's folder) and a
  label column (`image_column`, `label_column`);
- a Hub dataset with `image` and `label` columns (`dataset_name=...`).
The labels come from the data (a `ClassLabel`'s names, else the sorted values) or `id2label=`,
and go into the exported config as `id2label`/`label2id`, so
`pipeline("image-classification", model=output_dir)` names them.

Images stay files in the datasets: each batch is decoded, augmented at training time (random
resized crop and horizontal flip, drawn from torch's RNG so that resume is exact; `augment=false`
turns it off) and turned into `pixel_values` by the model's image processor (PIL backend), through
`datasets.Dataset.with_transform`. Metrics: eval_accuracy, and eval_top5_accuracy with more than
5 classes. do_predict writes one JSON line per image: its path, label and score.

The embedded default: scikit-learn's 1,797 handwritten digit scans (8x8, upscaled to 32x32) on a
tiny ResNet built from a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notrainer.config import key
from notrainer.data import files as data
from notrainer.errors import UsageError, check

from .base import Task
from .common import check_head_size, check_no_unseen_labels, label_ids
from . import vision

IMAGE_CANDIDATES = ("image", "img", "image_path", "path", "file", "filename", "file_name")
LABEL_CANDIDATES = ("label", "labels", "fine_label", "class")


@dataclass
class ImageClassificationConfig(vision.VisionConfig):
    label_column: Optional[str] = key(None, "column with the label (default: label, labels)")

    def validate(self) -> None:
        super().validate()
        named = [c for c in (self.image_column, self.label_column) if c]
        check(len(named) == len(set(named)), "image_column and label_column must name different columns")


class ImageClassificationTask(Task):
    name = "image_classification"
    Config = ImageClassificationConfig
    auto_model = "AutoModelForImageClassification"
    tiny_model_type = "resnet"
    has_text = False
    embedded_defaults = dict(learning_rate=3e-3, num_train_epochs=5.0, per_device_train_batch_size=32,
                             per_device_eval_batch_size=128, image_size=32, horizontal_flip=False, crop_scale_min=0.6,
                             warmup_ratio=0.05, weight_decay=0.01)

    # Settled by load_raw_datasets (lifecycle step 2): the head follows from them.
    #: the image column, the label column (None: no labels)
    image_col: str = "image"
    label_col: Optional[str] = None
    #: label names in id order
    label_names: list[str] = []
    #: a ClassLabel feature's names (raw ints -> names), else None
    _class_names: Optional[list[str]] = None
    #: the test split's image paths (prediction records name them), else None
    _test_paths: Optional[list] = None

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        return builtin_digits()

    def load_raw_datasets(self):
        vision.require_pillow(self.name)
        cfg = self.cfg
        raw, checked = vision.load_folders(cfg, vision.is_class_folder, vision.class_folder,
                                           super().load_raw_datasets)
        self.image_col, self.label_col = self.find_columns(raw)
        raw = self.decode_paths(raw, checked)
        self.find_labels(raw)
        return raw

    def find_columns(self, raw) -> tuple[str, Optional[str]]:
        cfg = self.cfg
        ref = raw["train"] if "train" in raw else next(iter(raw.values()))
        names = ref.column_names
        image = cfg.image_column or next((c for c in IMAGE_CANDIDATES if c in names), None)
        check(image is not None, f"no image column found (columns: {', '.join(names)}); set image_column=...")
        label = cfg.label_column or next((c for c in LABEL_CANDIDATES if c in names), None)
        if label is None and ("train" in raw or "validation" in raw):
            raise UsageError(f"no label column found (columns: {', '.join(names)}); set label_column=...")
        for split_name, split in raw.items():
            data.require_columns(split, {"image_column": image})
            if split_name != "test":
                data.require_columns(split, {"label_column": label})
        return image, label

    def decode_paths(self, raw, checked: set):
        """A column of paths becomes a datasets `Image` column (still files, decoded per batch);
        every file is opened first, so a missing or unreadable one fails before training."""
        import datasets

        out = {}
        for split, ds in raw.items():
            col = ds.features[self.image_col]
            if isinstance(col, datasets.Image):
                out[split] = ds
                continue
            paths = ds[self.image_col]
            if split not in checked:
                paths = vision.resolve_paths(paths, vision.source_file(self.cfg, split), self.image_col)
            if split == "test":
                self._test_paths = list(paths)
            out[split] = vision.as_image_column(ds, self.image_col, paths)
        return datasets.DatasetDict(out)

    def find_labels(self, raw) -> None:
        import datasets

        cfg = self.cfg
        given = vision.parse_id2label(cfg.id2label)
        if "train" not in raw and given is None:
            config = self.pretrained_config("labels")
            self.label_names = [config.id2label[i] for i in range(config.num_labels)]
            return
        feature = raw["train"].features[self.label_col] if "train" in raw else None
        if isinstance(feature, datasets.ClassLabel):
            self._class_names = list(feature.names)
        if given is not None:
            self.label_names = given
        elif self._class_names is not None:
            self.label_names = list(self._class_names)
        else:
            values = raw["train"][self.label_col]
            check(all(v is not None for v in values), f"label_column={self.label_col!r} has empty values in the training data")
            seen = {str(v) for v in values}
            numeric = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
            self.label_names = sorted(seen, key=int) if numeric else sorted(seen)
        check(len(self.label_names) >= 2, f"the data has {len(self.label_names)} label(s) ({self.label_names}); "
                                          "image classification needs at least two")
        for split in ("train", "validation"):
            if split in raw and self.label_col in raw[split].column_names:
                self.check_label_range(raw[split], split)
        if given is None and self._class_names is None:
            check_no_unseen_labels(raw, self.label_col, lambda vals: {str(v) for v in vals}, self.label_names, "labels")

    def check_label_range(self, ds, split: str) -> None:
        """Integer labels index the label names: one outside 0..N-1 is refused, naming the row."""
        n = len(self.label_names)
        indexed = self._class_names is not None or self.cfg.id2label is not None
        for i, v in enumerate(ds[self.label_col]):
            check(v is not None, f"label_column={self.label_col!r}: row {i} of the {split} data has no label")
            if indexed and isinstance(v, (int, np.integer)):
                check(0 <= v < n, f"label_column={self.label_col!r}: label {v} in row {i} of the {split} data is out "
                                  f"of range (the {n} labels are 0..{n - 1})")
            elif indexed:
                check(str(v) in self.label_names, f"label_column={self.label_col!r}: label {v!r} in row {i} of the "
                                                  f"{split} data is not one of id2label's {n} names")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def label2id(self) -> dict[str, int]:
        return label_ids(self.label_names)

    def encode_label(self, value) -> int:
        if isinstance(value, (int, np.integer)) and (self._class_names is not None or self.cfg.id2label is not None):
            return int(value)
        return self.label2id[str(value)]

    # ------------------------------------------------------------------ processor and model

    def build_processor(self, raw):
        def default():
            from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

            s = self.cfg.image_size
            return ViTImageProcessorPil(size={"height": s, "width": s})

        return vision.build_image_processor(self.cfg, default)

    def model_kwargs(self, processor) -> dict:
        return dict(num_labels=self.num_labels, id2label=dict(enumerate(self.label_names)), label2id=self.label2id)

    def tiny_config(self, processor):
        return tiny_vision_config(self.tiny_model_type, **self.model_kwargs(processor))

    def build_model(self, processor):
        order = check_head_size(self.cfg, "ForImageClassification", self.num_labels, "labels")
        if order and set(order) == set(self.label_names) and self.cfg.id2label is None and self._class_names is None:
            self.label_names = order  # a fine-tuned head keeps its own label ids
        return super().build_model(processor)

    # ------------------------------------------------------------------ batches

    def prepare_datasets(self, raw, processor):
        """Each split keeps its images as files (or encoded bytes) plus the label ids; the
        pixels are computed per batch (`with_transform`)."""
        import datasets

        out = {}
        for split, ds in raw.items():
            keep = ds.select_columns([self.image_col])
            if split != "test" and self.label_col in ds.column_names:
                keep = keep.add_column("labels", [self.encode_label(v) for v in ds[self.label_col]])
            if self.image_col != "image":
                keep = keep.rename_column(self.image_col, "image")
            out[split] = keep.with_transform(self.transform(processor, train=split == "train"))
        return datasets.DatasetDict(out)

    def transform(self, processor, train: bool):
        cfg = self.cfg
        size = vision.target_size(processor)
        augment = train and cfg.augment

        def apply(batch):
            images = [vision.as_rgb(im) for im in batch["image"]]
            if augment:
                images = [vision.augment(im, size, (cfg.crop_scale_min, 1.0), cfg.horizontal_flip)[0] for im in images]
            out = {"pixel_values": processor(images, return_tensors="pt")["pixel_values"]}
            if "labels" in batch:
                out["labels"] = batch["labels"]
            return out

        return apply

    def collator(self, processor):
        from transformers import default_data_collator

        return default_data_collator

    def num_tokens(self, batch):
        return 0

    # ------------------------------------------------------------------ evaluation

    def eval_step(self, model, batch):
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        out = {"predictions": logits.argmax(-1), "scores": torch.softmax(logits, -1)}
        labels = batch.get("labels")
        if labels is not None:
            out.update(loss=torch.nn.functional.cross_entropy(logits, labels, reduction="none"),
                       num_items=torch.ones_like(labels), labels=labels)
        return out

    def compute_metrics(self, outputs, eval_loss):
        from notrainer.metrics import load_metric

        if "labels" not in outputs:
            return {}
        preds, refs = np.concatenate(outputs["predictions"]), np.concatenate(outputs["labels"])
        out = {"accuracy": load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]}
        if self.num_labels > 5:
            from sklearn.metrics import top_k_accuracy_score

            scores = np.concatenate(outputs["scores"])
            out["top5_accuracy"] = float(top_k_accuracy_score(refs, scores, k=5, labels=list(range(self.num_labels))))
        return out

    def predict_step(self, model, batch):
        out = self.eval_step(model, batch)
        return {"predictions": out["predictions"], "scores": out["scores"]}

    def format_predictions(self, outputs, dataset) -> list[dict]:
        preds = np.concatenate(outputs["predictions"])
        scores = np.concatenate(outputs["scores"])
        records = [{"label": self.label_names[int(p)], "score": round(float(s[int(p)]), 6)} for p, s in zip(preds, scores)]
        paths = self._test_paths
        if paths is None:  # images from a Hub dataset: their file names, when they kept them
            try:
                paths = [(x or {}).get("path") for x in dataset.with_format(None).cast_column(
                    "image", __import__("datasets").Image(decode=False))["image"]]
            except Exception:
                paths = None
        if paths is not None and len(paths) == len(records):
            records = [{"image": p, **r} for p, r in zip(paths, records)]
        return records


# ---------------------------------------------------------------------- tiny models and built-in data


def tiny_vision_config(model_type: str, **overrides):
    """A small random-init vision config of `model_type` for CPU runs (well under 1M parameters)."""
    from transformers import AutoConfig

    sizes = {
        "resnet": dict(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
                       downsample_in_first_stage=False),
        "convnext": dict(hidden_sizes=[32, 64, 128], depths=[1, 1, 1], patch_size=2, num_stages=3),
        "vit": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32,
                    patch_size=4),
        "segformer": dict(num_encoder_blocks=3, depths=[1, 1, 1], sr_ratios=[4, 2, 1], hidden_sizes=[16, 32, 64],
                          patch_sizes=[7, 3, 3], strides=[4, 2, 2], num_attention_heads=[1, 1, 2], mlp_ratios=[2, 2, 2],
                          decoder_hidden_size=32),
    }
    return AutoConfig.for_model(model_type, **{**sizes.get(model_type, {}), **overrides})


def digits_images(size: int = 32):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 16 grey levels) as
    `size`x`size` greyscale PIL images, with their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((x * (255 / 16)).round().astype(np.uint8), mode="L").resize((size, size), Image.Resampling.BICUBIC)
              for x in digits.images]
    return images, [int(t) for t in digits.target]


def builtin_digits(n_validation: int = 297):
    """The digits in a fixed shuffled order: 1,500 for training, 297 held out."""
    import datasets

    images, labels = digits_images()
    order = np.random.default_rng(0).permutation(len(images))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})

    def part(idx):
        return datasets.Dataset.from_dict({"image": [images[i] for i in idx], "label": [labels[i] for i in idx]},
                                          features=features)

    return datasets.DatasetDict(train=part(order[n_validation:]), validation=part(order[:n_validation]))
