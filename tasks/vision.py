"""Helpers the vision tasks share (image_classification, semantic_segmentation).

- `require_pillow`: the one line naming `pip install 'notrainer[vision]'` when Pillow is missing.
- Reading images: `check_image` (exists and decodes), `class_folder` (one subfolder per class),
  `pair_folder` (images/ and masks/ with matching names), `resolve_paths` (a path column of a
  csv/jsonl, relative to the file's folder).
- `VisionConfig`: the keys both vision tasks share (image column, id2label, image processor,
  image size, augmentation).
- `parse_id2label`: label names from a json file, inline json or a comma list.
- `build_image_processor`: `AutoImageProcessor` with the PIL backend (no torchvision needed).
- Augmentation drawn from torch's RNG (the loop's data RNG stream makes resume exact):
  `random_resized_crop` and `random_flip`, applied alike to an image and its mask.

Images stay files (or encoded bytes) in the datasets; they are decoded and transformed per
batch through `datasets.Dataset.with_transform`, never stored as float tensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from notrainer.config import TrainConfig, key
from notrainer.errors import UsageError, check, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class VisionConfig(TrainConfig):
    """Keys image_classification and semantic_segmentation share; each redeclares only a default."""

    image_column: Optional[str] = key(None, "column with the image (or its path) (default: image, img, image_path, path, file)")
    id2label: Optional[str] = key(None, "label names in id order: a json file, inline json ({\"0\": \"cat\", ...}) or a comma list "
                                        "(default: from the data)")
    image_processor_name: Optional[str] = key(None, "image processor folder or hub name (default: model_name_or_path's, else a "
                                                    "plain resize + normalize)")
    image_size: int = key(224, "side of the square images of the built-in image processor (ignored with a model's processor)")
    augment: bool = key(True, "train-time augmentation: random resized crop (and horizontal_flip), a mask cropped "
                              "alike; none at eval")
    horizontal_flip: bool = key(True, "with augment: flip half of the training images (and masks) left-right")
    crop_scale_min: float = key(0.08, "with augment: smallest area fraction of a random resized crop")

    #: the smallest image_size the task's tiny default model takes
    min_image_size = 8

    def task_reads_itself(self, value) -> bool:
        return is_image_folder(value)  # class / pair / image folders: read by the task, not as data files

    def validate(self) -> None:
        super().validate()
        check(0 < self.crop_scale_min <= 1, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        check(self.image_size >= self.min_image_size,
              f"image_size must be >= {self.min_image_size}, got {self.image_size}")


def require_pillow(task_name: str) -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UsageError(f"task={task_name} needs Pillow: pip install 'notrainer[vision]'") from None


def check_image(path: str, key_name: str):
    """Open `path` as an image (fully decoded); a missing or unreadable file is a usage error.
    Returns the image's (width, height)."""
    from PIL import Image

    check(os.path.isfile(path), f"{key_name}: image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:
        raise UsageError(f"{key_name}: {path} is not a readable image ({first_line(e)})") from None


def image_files(folder: str, key_name: str) -> list[str]:
    """The files of `folder` (hidden ones skipped), each checked to be a readable image."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    paths = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    for path in paths:
        check_image(path, key_name)
    return paths


def _has_images(folder: str) -> bool:
    return any(n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(folder))


def is_class_folder(path) -> bool:
    """A folder of subfolders (one per class) holding images; a folder of data-file shards is not one."""
    if not isinstance(path, str) or not os.path.isdir(path):
        return False
    subs = [os.path.join(path, n) for n in os.listdir(path) if not n.startswith(".")]
    subs = [d for d in subs if os.path.isdir(d)]
    return bool(subs) and any(_has_images(d) for d in subs)


def is_image_folder(path) -> bool:
    """A folder the vision tasks read themselves: classes, images + masks, or plain images."""
    return isinstance(path, str) and os.path.isdir(os.path.expanduser(path)) and (
        is_class_folder(path) or is_pair_folder(path) or _has_images(path))


def class_folder(root: str, key_name: str) -> dict[str, list]:
    """An image folder (root/<class>/<image>): {"image": paths, "label": class names}. A file
    beside the class folders, an empty class folder or a file that is not an image is refused."""
    entries = sorted(n for n in os.listdir(root) if not n.startswith("."))
    loose = [n for n in entries if not os.path.isdir(os.path.join(root, n))]
    if loose:
        raise UsageError(f"{key_name}={root}: {loose[0]} is not in a class folder (an image folder holds one "
                         "subfolder per class)")
    images, labels = [], []
    for name in entries:
        paths = image_files(os.path.join(root, name), key_name)
        check(bool(paths), f"{key_name}={root}: the class folder {name!r} is empty")
        images += paths
        labels += [name] * len(paths)
    return {"image": images, "label": labels}


MASK_FOLDERS = ("masks", "annotations", "labels", "mask")
IMAGE_FOLDERS = ("images", "image", "img")


def is_pair_folder(path) -> bool:
    return isinstance(path, str) and os.path.isdir(path) and \
        any(os.path.isdir(os.path.join(path, n)) for n in IMAGE_FOLDERS) and \
        any(os.path.isdir(os.path.join(path, n)) for n in MASK_FOLDERS)


def pair_folder(root: str, key_name: str) -> dict[str, list]:
    """root/images/<name>.<ext> with root/masks/<name>.png (or annotations/, labels/): matched
    by file name without extension. An image without a mask (or a mask without an image) is refused."""
    img_dir = next(os.path.join(root, n) for n in IMAGE_FOLDERS if os.path.isdir(os.path.join(root, n)))
    mask_dir = next(os.path.join(root, n) for n in MASK_FOLDERS if os.path.isdir(os.path.join(root, n)))
    images = {os.path.splitext(os.path.basename(p))[0]: p for p in image_files(img_dir, key_name)}
    masks = {os.path.splitext(os.path.basename(p))[0]: p for p in image_files(mask_dir, key_name)}
    check(bool(images), f"{key_name}={root}: {img_dir} holds no image")
    for stem in images:
        check(stem in masks, f"{key_name}={root}: image {images[stem]} has no mask in {mask_dir}")
    for stem in masks:
        check(stem in images, f"{key_name}={root}: mask {masks[stem]} has no image in {img_dir}")
    stems = sorted(images)
    return {"image": [images[s] for s in stems], "mask": [masks[s] for s in stems]}


def resolve_paths(paths: list, data_file: str | None, column: str) -> list[str]:
    """A csv/jsonl path column: relative paths are taken from the data file's folder (else the
    working directory). Every file is checked to be a readable image."""
    base = os.path.dirname(os.path.abspath(data_file)) if data_file else os.getcwd()
    out = []
    for i, p in enumerate(paths):
        check(isinstance(p, str) and p, f"image_column={column!r}: row {i} has no path")
        full = os.path.expanduser(p)
        if not os.path.isabs(full) and os.path.exists(os.path.join(base, full)):
            full = os.path.join(base, full)
        check_image(full, f"{column} row {i}")
        out.append(full)
    return out


def parse_id2label(value) -> list[str] | None:
    """`id2label=`: a json file or inline json ({"0": "background", ...} or a list), or a comma
    list of names. Returns the names in id order."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        data = value
    else:
        text = str(value).strip()
        if os.path.isfile(os.path.expanduser(text)):
            try:
                with open(os.path.expanduser(text), encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"id2label={text}: not a json file ({first_line(e)})") from None
        elif text.startswith(("{", "[")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"id2label: not valid json ({first_line(e)})") from None
        else:
            return [n.strip() for n in text.split(",") if n.strip()]
    if isinstance(data, list):
        return [str(v) for v in data]
    check(isinstance(data, dict), "id2label must map ids to names")
    try:
        ids = sorted(int(k) for k in data)
    except ValueError:
        raise UsageError("id2label: its keys must be label ids (0, 1, ...)") from None
    check(ids == list(range(len(ids))), f"id2label: the ids must be 0..{len(ids) - 1} with none missing")
    return [str(data[str(i)] if str(i) in data else data[i]) for i in ids]


def build_image_processor(cfg, default):
    """`image_processor_name`, else model_name_or_path's processor (PIL backend), else `default()`."""
    name = getattr(cfg, "image_processor_name", None) or cfg.model_name_or_path or cfg.config_name
    if name is None:
        return default()
    from transformers import AutoImageProcessor

    from notrainer.data import files
    from notrainer.modeling.lora import adapter_base

    files.check_local_model_path(name, "image_processor_name")
    name = adapter_base(name) or name
    try:
        return AutoImageProcessor.from_pretrained(name, backend="pil", trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise UsageError(f"image processor {name!r} could not be loaded: {first_line(e)} "
                         "(give image_processor_name=... naming a folder with preprocessor_config.json)") from None


def target_size(processor) -> tuple[int, int]:
    """(height, width) the processor produces: its crop_size, else its size."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if getattr(processor, "do_center_crop", False) is False and attr == "crop_size":
            continue
        if isinstance(size, dict) or hasattr(size, "get"):
            size = dict(size)
            if size.get("height") and size.get("width"):
                return int(size["height"]), int(size["width"])
            if size.get("shortest_edge"):
                return int(size["shortest_edge"]), int(size["shortest_edge"])
        if isinstance(size, int):
            return size, size
    return 224, 224


# ---------------------------------------------------------------------- augmentation (torch RNG)


def random_resized_crop(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """A crop box (left, top, right, bottom) covering a random area fraction in `scale` with a
    random aspect ratio in `ratio` (log-uniform), as RandomResizedCrop draws it; after ten
    misses, the central crop of the nearest allowed ratio."""
    import torch

    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_flip(p: float = 0.5) -> bool:
    import torch

    return bool(torch.rand(1) < p)


def augment(image, size: tuple[int, int], scale: tuple[float, float], flip: bool, mask=None):
    """The same random resized crop (to `size` = (height, width)) and horizontal flip for an
    image (bilinear) and its mask (nearest)."""
    from PIL import Image

    box = random_resized_crop(image.width, image.height, scale=scale)
    flipped = flip and random_flip()
    out = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)
    if flipped:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if mask is None:
        return out, None
    m = mask.resize((size[1], size[0]), Image.Resampling.NEAREST, box=box)
    if flipped:
        m = m.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out, m


def as_rgb(image):
    """A decoded image (PIL, or a path) in RGB."""
    from PIL import Image

    if isinstance(image, str):
        image = Image.open(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_folders(cfg, is_folder, read_folder, load_default):
    """The raw splits when train_file/validation_file/test_file name folders the task reads
    itself: `is_folder(path)` says which (a test folder may also be plain images, read by
    `image_files`), `read_folder(path, key_name)` gives a folder's columns; the other splits
    load as data files. Without such folders (or with a dataset_name) `load_default()` loads
    them all. Returns (raw, the splits read from folders, whose files are already checked)."""
    import dataclasses
    import os

    import datasets

    from notrainer.data import files as data
    from notrainer.data.raw import load_raw_datasets

    given = {s: v for s, v in (("train", cfg.train_file), ("validation", cfg.validation_file),
                               ("test", cfg.test_file)) if v}
    folders = {s for s, v in given.items()
               if isinstance(v, str) and (is_folder(v) or s == "test" and os.path.isdir(v))}
    if not folders or cfg.dataset_name:
        return load_default(), set()

    def from_folders():
        out = {}
        for split, value in given.items():
            if split in folders:
                rows = read_folder(value, f"{split}_file") if is_folder(value) \
                    else {"image": image_files(value, f"{split}_file")}
                out[split] = datasets.Dataset.from_dict(rows)
            else:
                out.update(data.load_files({split: value}))
        return out

    plain = dataclasses.replace(cfg, train_file=None, validation_file=None, test_file=None)
    return load_raw_datasets(plain, builtin=from_folders), folders


def as_image_column(ds, column: str, paths: list):
    """`ds` with `column` replaced by the image files `paths`, as a datasets `Image` column
    (still files, decoded per batch). The new column goes in before the old one leaves: a split
    whose only column is the image would otherwise have no rows left to add it to."""
    import datasets

    ds = ds.add_column("_image_paths", list(paths)).remove_columns(column).rename_column("_image_paths", column)
    return ds.cast_column(column, datasets.Image())


def source_file(cfg, split: str):
    """The data file a split came from (for relative image paths), or None."""
    from notrainer.data.files import resolve_files

    value = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}.get(split)
    if not value and split == "validation":  # held out of the training data (validation_split_percentage)
        value = cfg.train_file
    if not value:
        return None
    try:
        found = resolve_files(value, f"{split}_file")
    except UsageError:
        return None
    return found[0] if found else None
