"""Mean IoU as a local `evaluate` module, with the definitions of evaluate's `mean_iou` metric.

Per category c, over all pixels whose reference is not `ignore_index`:
area_intersect[c] (predicted c and reference c), area_pred[c], area_label[c], and
area_union = area_pred + area_label - area_intersect. Then
- per_category_iou = area_intersect / area_union, per_category_accuracy = area_intersect / area_label
  (NaN for a category absent from both, resp. from the references);
- mean_iou, mean_accuracy: their NaN-ignoring means;
- overall_accuracy = sum(area_intersect) / sum(area_label).
`reduce_labels`: reference 0 becomes 255 and every other reference goes down by one, before
`ignore_index` is applied (as evaluate does); `label_map` renames reference ids first.

The sums come from one confusion matrix (reference x prediction), which can be accumulated
batch by batch and across processes: `confusion_matrix` adds one pair of masks, `scores` reads
the metrics from the total. The segmentation task sums per-example matrices gathered from every
rank rather than gathering whole masks.
"""

import datasets
import evaluate
import numpy as np


def confusion_matrix(prediction, reference, num_labels: int, ignore_index: int = 255, label_map=None,
                     reduce_labels: bool = False) -> np.ndarray:
    """(num_labels, num_labels) counts of reference (rows) x prediction (columns) for one pair of
    masks; pixels whose reference is `ignore_index` (or out of 0..num_labels-1) are skipped."""
    pred = np.asarray(prediction, dtype=np.int64)
    ref = np.asarray(reference, dtype=np.int64).copy()
    if label_map:
        mapped = ref.copy()
        for old, new in label_map.items():
            mapped[ref == old] = new
        ref = mapped
    if reduce_labels:
        ref[ref == 0] = 255
        ref = ref - 1
        ref[ref == 254] = 255
    keep = (ref != ignore_index) & (ref >= 0) & (ref < num_labels)
    pred, ref = pred[keep], ref[keep]
    # a predicted id outside the labels counts in no column (but still in its reference's area_label)
    valid = (pred >= 0) & (pred < num_labels)
    counts = np.bincount(ref[valid] * num_labels + pred[valid], minlength=num_labels * num_labels)
    matrix = counts.reshape(num_labels, num_labels)
    extra = np.bincount(ref[~valid], minlength=num_labels)  # area_label of wrongly predicted out-of-range pixels
    return matrix, extra


def scores(matrix, extra_label_area=None, nan_to_num=None) -> dict:
    """The metrics from an accumulated confusion matrix (reference x prediction)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    intersect = np.diag(matrix)
    area_pred = matrix.sum(0)
    area_label = matrix.sum(1) + (np.asarray(extra_label_area, dtype=np.float64) if extra_label_area is not None else 0)
    union = area_pred + area_label - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
        overall = intersect.sum() / area_label.sum()
    out = {"mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
           "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
           "overall_accuracy": float(overall), "per_category_iou": iou, "per_category_accuracy": acc}
    if nan_to_num is not None:
        out = {k: np.nan_to_num(v, nan=nan_to_num) if isinstance(v, np.ndarray) else
               (nan_to_num if v != v else v) for k, v in out.items()}
    return out


class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean intersection over union, mean accuracy, overall accuracy and per-category IoU/accuracy "
                        "of segmentation masks (the definitions of evaluate's mean_iou).",
            citation="Same definitions as the mean_iou metric of the evaluate library (from MMSegmentation).",
            inputs_description="predictions, references: 2-d integer masks; num_labels; ignore_index; nan_to_num; "
                               "label_map; reduce_labels",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                                        "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16")))}),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int, nan_to_num=None, label_map=None,
                 reduce_labels: bool = False):
        total = np.zeros((num_labels, num_labels), dtype=np.int64)
        extra = np.zeros(num_labels, dtype=np.int64)
        for pred, ref in zip(predictions, references):
            m, e = confusion_matrix(pred, ref, num_labels, ignore_index, label_map, reduce_labels)
            total += m
            extra += e
        return scores(total, extra, nan_to_num)
