"""Pictures of a run and one HTML page: `python -m notrainer.observability.report runs/x`.

Reads `log_history.jsonl` (see `notrainer.observability.history`), `config.yaml` and, when the run has
finished, `all_results.json`; writes into the run directory

    plots/train_loss.png         train loss, raw and smoothed (eval loss on the same axes)
    plots/eval_metrics.png       every eval_* metric against step (one panel each)
    plots/learning_rate.png
    plots/grad_norm.png
    plots/tokens_per_second.png
    report.html                  the pictures (embedded, so the page is one file to share, and
                                 linked to the PNGs), the config and the final results

A picture whose values were never logged is left out. It works on a run in progress (a
checkpointed folder, no `all_results.json` yet): the page then says which step it reached.
The loop calls `write_report(output_dir)` at the end of training on the main process.

Plotting uses matplotlib (the optional extra `notrainer[report]`) through its object API and
the Agg canvas: no display, no global pyplot state, safe next to a training loop.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

from notrainer.observability import history
from notrainer.errors import UsageError

INSTALL_HINT = "plots need matplotlib: pip install 'notrainer[report]'"
PLOTS_DIR = "plots"
REPORT_FILE = "report.html"


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled toward 0
    (TensorBoard's smoothing). Non-finite values are passed through, not averaged in."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if r.get("kind", "train") == kind and isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _eval_metric_names(records: list[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        if r.get("kind") == "eval":
            for k, v in r.items():
                if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                    names.append(k)
    # Runtime figures are not quality metrics; they would crowd the panels.
    return [n for n in names if not n.endswith(("_runtime", "_samples_per_second", "_steps_per_second", "_samples"))]


def _figure(panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = (panels + cols - 1) // cols
    fig = Figure(figsize=(6.4 * cols if panels > 1 else 7.5, 4.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    return fig, axes


def _save(fig, path: str) -> None:
    """Write via a temp file + rename: a viewer refreshing the page never reads half a PNG."""
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".plot.", suffix=".png", dir=os.path.dirname(path))
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _single(path: str, title: str, ylabel: str, xs, ys, log_y: bool = False) -> None:
    fig, (ax,) = _figure()
    ax.plot(xs, ys, marker="." if len(xs) < 50 else None, color="tab:blue")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if log_y and ys and min(ys) > 0:
        ax.set_yscale("log")
    _save(fig, path)


def write_plots(output_dir: str, records: Optional[list[dict]] = None) -> list[str]:
    """The PNGs for whatever the history holds; returns their paths. Needs matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    records = history.read(output_dir) if records is None else records
    plots = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(plots, exist_ok=True)
    written = []

    xs, ys = _series(records, "train", "loss")
    if not ys:  # a history written with the trackers' name
        xs, ys = _series(records, "train", "train_loss")
    ex, ey = _series(records, "eval", "eval_loss")
    if ys or ey:
        fig, (ax,) = _figure()
        if ys:
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, label="train loss")
            ax.plot(xs, smooth(ys), color="tab:blue", label="train loss (smoothed)")
        if ey:
            ax.plot(ex, ey, color="tab:orange", marker="o", label="eval loss")
        ax.set_title("loss")
        ax.set_ylabel("loss")
        ax.legend()
        path = os.path.join(plots, "train_loss.png")
        _save(fig, path)
        written.append(path)

    names = _eval_metric_names(records)
    if names:
        fig, axes = _figure(len(names))
        for ax, name in zip(axes, names):
            mx, my = _series(records, "eval", name)
            ax.plot(mx, my, marker="o", color="tab:green")
            ax.set_title(name)
        path = os.path.join(plots, "eval_metrics.png")
        _save(fig, path)
        written.append(path)

    for key, title, log_y in (("learning_rate", "learning rate", False), ("grad_norm", "gradient norm (before clipping)", True),
                              ("tokens_per_second", "tokens per second", False)):
        kx, ky = _series(records, "train", key)
        if ky:
            path = os.path.join(plots, f"{key}.png")
            _single(path, title, key, kx, ky, log_y=log_y)
            written.append(path)
    return written


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _table(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def write_html(output_dir: str, plots: list[str], records: list[dict]) -> str:
    """report.html: self-contained (PNGs embedded as data URIs), each picture links its file."""
    name = os.path.basename(os.path.abspath(output_dir))
    results = _read_json(os.path.join(output_dir, "all_results.json"))
    config = _read_text(os.path.join(output_dir, "config.yaml"))
    last_step = max((r.get("step", 0) for r in records), default=0)
    if results is None:
        status = f"in progress (or stopped): history up to step {last_step}, no all_results.json yet"
    else:
        status = f"finished: {last_step} steps"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>notrainer report: {html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "th,td{border:1px solid #ddd;padding:2px 8px;text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}"
        "</style></head><body>",
        f"<h1>{html.escape(name)}</h1><p>{html.escape(status)}</p>",
    ]
    if results:
        parts.append("<h2>Final results</h2>" + _table(results))
    parts.append("<h2>Curves</h2>")
    if not plots:
        parts.append("<p>No values logged yet.</p>")
    for path in plots:
        rel = os.path.relpath(path, output_dir).replace(os.sep, "/")
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(f"<figure><a href='{html.escape(rel)}'><img src='data:image/png;base64,{data}' "
                     f"alt='{html.escape(rel)}'></a><figcaption>{html.escape(rel)}</figcaption></figure>")
    if config is not None:
        parts.append("<h2>Config</h2><pre>" + html.escape(config) + "</pre>")
    parts.append("</body></html>")
    path = os.path.join(output_dir, REPORT_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=output_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
    return path


def write_report(output_dir: str) -> dict[str, Any]:
    """Plots + report.html for a finished or running run. Raises UsageError without matplotlib
    or when the folder has no history."""
    if not os.path.isdir(output_dir):
        raise UsageError(f"{output_dir}: no such run directory")
    records = history.read(output_dir)
    if not records and not os.path.exists(history.history_path(output_dir)):
        raise UsageError(f"{output_dir}: no {history.HISTORY_FILE} (is this a notrainer run directory?)")
    plots = write_plots(output_dir, records)
    page = write_html(output_dir, plots, records)
    return {"plots": plots, "html": page}


def maybe_write_report(output_dir: str, log=print) -> Optional[dict[str, Any]]:
    """For the end of training: the report, or one line saying why not (never fails the run)."""
    try:
        return write_report(output_dir)
    except UsageError as e:
        log(f"notrainer: report skipped: {e}")
        return None


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m notrainer.observability.report RUN_DIR   (writes RUN_DIR/plots/*.png and RUN_DIR/report.html)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        out = write_report(argv[0])
    except UsageError as e:
        print(f"notrainer: error: {e}", file=sys.stderr)
        return 2
    print(out["html"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
