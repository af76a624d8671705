"""Prediction mode: run a model over test_file and write one JSON line per example.

    python -m notrainer.run task=seq2seq mode=predict model_name_or_path=runs/seq2seq \
        test_file=test.jsonl output_dir=runs/seq2seq-pred

The task says what a prediction is: `predict_step(model, batch)` returns per-example tensors
(gathered from every rank like eval outputs, in dataset order) and `format_predictions`
turns them into records (generated text, a label, tags, an answer).
"""

from __future__ import annotations

import os

from notrainer.data.files import write_jsonl

PREDICTIONS_FILE = "predictions.jsonl"


def write_predictions(loop, task) -> str:
    """Predict on loop.predict_loader and write output_dir/predictions.jsonl (main process)."""
    acc = loop.accelerator
    outputs = loop.predict(predict_fn=task.predict_step)
    records = task.format_predictions(outputs, loop.predict_loader.dataset)
    path = os.path.join(loop.output_dir, PREDICTIONS_FILE)
    if acc.is_main_process:
        os.makedirs(loop.output_dir, exist_ok=True)
        write_jsonl(path, records)
    acc.wait_for_everyone()
    acc.print(f"{len(records)} predictions written to {path}")
    return path
