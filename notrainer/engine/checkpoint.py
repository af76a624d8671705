"""Checkpoints, exact resume, retention, the best model and the final export.

Layout under output_dir:

    checkpoints/step_<N>/       accelerate save_state (model.safetensors, optimizer, scheduler,
                                scaler, RNG of every rank) + loop_state.json (the loop's
                                counters) + config.yaml (the resolved run config) + COMPLETE
                                (written last: the list of files and their sizes)
    checkpoints/.tmp-step_<N>/  a checkpoint being written; never resumed
    config.json, model.safetensors, tokenizer files   the final model (from_pretrained)
    all_results.json

A checkpoint is written into a temporary folder and renamed to step_<N> only after every rank
has finished and the COMPLETE mark is in it, so a crash mid-save leaves the previous
checkpoints as they were. On resume the COMPLETE list is checked against the files (and the
small files are parsed): a damaged newest checkpoint is reported in one line and the previous
one is used. Retention (`save_total_limit`) keeps the newest N and always the best one.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import time
from typing import Callable

from notrainer.errors import UsageError, first_line
from notrainer.engine.state import RunState

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "loop_state.json"
CONFIG_FILE = "config.yaml"
COMPLETE_MARK = "COMPLETE"
MODEL_FILE = "model.safetensors"
_STEP_RE = re.compile(r"^step_(\d+)$")


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_DIR)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARK)) and os.path.isfile(os.path.join(path, STATE_FILE))


def step_of(path: str) -> int:
    m = _STEP_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (by step number, not by name or mtime)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def check_run_folder(output_dir: str, key_name: str = "output_dir") -> None:
    """output_dir (and the folders a run makes in it) can be made and written: a path that is
    an existing file, under a file, or in a folder without write permission is one line here,
    before anything heavy, instead of a FileExistsError from os.makedirs at the first save."""
    for path in (output_dir, checkpoint_root(output_dir), os.path.join(output_dir, "logs")):
        if os.path.exists(path) and not os.path.isdir(path):
            what = "output_dir" if path == output_dir else f"{os.path.basename(path)}/ in output_dir"
            raise UsageError(f"{key_name}={output_dir}: {what} is an existing file, not a folder; "
                             "pick another output_dir or move the file away")
    parent = os.path.abspath(output_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{key_name}={output_dir}: {parent} is a file, so no folder can be made under it; "
                         "pick another output_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{key_name}={output_dir}: {parent} is not writable; pick another output_dir")


# ---------------------------------------------------------------------- saving


def save(acc, state: RunState, output_dir: str, *, save_total_limit: int | None = None,
         run_config: dict | None = None) -> str:
    """Write a checkpoint of the current step, atomically; every rank must call it.

    Saving the same state twice (a step checkpoint and the epoch-end one, or a preemption
    right after a scheduled save) writes it once. `run_config` is written beside the state as
    config.yaml (the CLI's resolved config; any dict)."""
    step = state.global_step
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step_{step}")
    snapshot = state.counters()
    if state.last_saved == snapshot and is_complete(final):
        return final
    tmp = os.path.join(root, f".tmp-step_{step}")
    if acc.is_main_process:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of saves that were interrupted
            if name.startswith((".tmp-", ".old-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(tmp)
        state.data_rng.save(tmp, acc.process_index)
        save_loader_state(tmp, acc.process_index, state.loader_state)  # inside tmp: the rename covers it
        acc.wait_for_everyone()  # every rank has written its part
        if acc.is_main_process:
            write_json(os.path.join(tmp, STATE_FILE), snapshot)
            _write_config(os.path.join(tmp, CONFIG_FILE), run_config)
            # The COMPLETE mark comes last and lists every file with its size: resume checks it.
            write_json(os.path.join(tmp, COMPLETE_MARK), {"step": step, "files": _file_sizes(tmp)})
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        # The half-written folder never carries a step_<N> name; it is removed to give the space
        # back. Nothing older was touched: retention only runs after a complete save.
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(_disk_full_message(root, final, output_dir, e)) from None
    if acc.is_main_process:
        if os.path.exists(final):  # same step saved again with a newer state (epoch end)
            old = os.path.join(root, f".old-step_{step}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _apply_retention(output_dir, step, save_total_limit, state.best_step)
    acc.wait_for_everyone()
    state.last_saved = snapshot
    state.last_checkpoint_time = time.monotonic()
    acc.print(f"checkpoint saved: {final}")
    return final


#: errors of a write that ran out of room: no space, over quota, over the file size limit (ulimit -f)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(UsageError):
    """A checkpoint could not be written for lack of space (the CLI prints it in one line, exit
    status 2). The previous checkpoint is complete and resumable; every rank says it, since
    each may be the one that ran out."""

    every_rank = True


def _disk_full_message(root: str, final: str, output_dir: str, error: OSError) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    done = list_checkpoints(output_dir)
    previous = f"the last complete checkpoint {done[-1]} is intact (resume_from_checkpoint=auto continues from it)" \
        if done else "no earlier checkpoint exists"
    return (f"checkpoint {final} could not be written in {root}: {os.strerror(error.errno).lower()} ({free}); "
            f"{previous}; free some space or set output_dir on a larger disk")


def _write_config(path: str, config: dict) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(config or {}, f, sort_keys=False)


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    return sizes


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _delete_checkpoint(path: str) -> None:
    # Drop the mark first: a deletion cut short leaves a folder that is never resumed.
    try:
        os.remove(os.path.join(path, COMPLETE_MARK))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def best_checkpoint(output_dir: str, best_step: int) -> str | None:
    if best_step < 0:
        return None
    path = os.path.join(checkpoint_root(output_dir), f"step_{best_step}")
    return path if is_complete(path) else None


def _apply_retention(output_dir: str, step: int, limit: int | None, best_step: int) -> None:
    complete = list_checkpoints(output_dir)
    # Checkpoints past this step belong to a timeline that was abandoned by resuming from an
    # older checkpoint: left in place, resume_from_checkpoint=auto would pick them up.
    for path in complete:
        if step_of(path) > step:
            print(f"removing {path}: newer than this run's step {step} (left by the run resumed before it)")
            _delete_checkpoint(path)
    if not limit:
        return
    complete = [p for p in complete if step_of(p) <= step]
    best = best_checkpoint(output_dir, best_step)
    for path in complete[:-limit]:
        if best is None or os.path.abspath(path) != os.path.abspath(best):
            _delete_checkpoint(path)


# ---------------------------------------------------------------------- checking and resolving


def verify(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be resumed, or None when it looks whole: every file
    the COMPLETE mark lists is there with its size, and the small files parse."""
    return _verify(path)[0]


def _verify(path: str) -> tuple[str | None, dict | None]:
    """(why it cannot be resumed or None, the loop's counters as read while checking)."""
    if not is_complete(path):
        return f"no {COMPLETE_MARK} mark", None
    try:
        with open(os.path.join(path, COMPLETE_MARK)) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARK} mark is unreadable", None
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing", None
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were written", None
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            counters = json.load(f)
        if os.path.isfile(os.path.join(path, MODEL_FILE)):
            _safetensors_shapes(os.path.join(path, MODEL_FILE))
        from accelerate.utils import load as torch_load_weights_only  # weights_only=True

        for name in files:
            if name.startswith("random_states_"):
                torch_load_weights_only(os.path.join(path, name))
    except Exception as e:  # noqa: BLE001 - any failure to parse means damaged
        return f"cannot be read ({first_line(e)})", None
    return None, counters


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A checkpoint resolved and verified once: its folder, the loop's counters read from it
    (loop_state.json) and whether it was found by 'auto' (then a load failure falls back to the
    previous checkpoint). `Loop(resume=...)` and `load` take it instead of reading it again."""

    path: str
    counters: dict
    auto: bool = False
    model_checked: bool = False  # the caller already compared its weights with the model

    @property
    def layout(self) -> dict | None:
        return self.counters.get("layout")


def resolve(output_dir: str, path_or_auto: str, report: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint folder to resume from (see `find_resume`); None when 'auto' finds none."""
    point = find_resume(output_dir, path_or_auto, report)
    return point.path if point is not None else None


def find_resume(output_dir: str, path_or_auto: str,
                report: Callable[[str], None] | None = None) -> ResumePoint | None:
    """The checkpoint to resume from, verified (its counters read once).

    'auto': the newest complete checkpoint in output_dir that passes `verify` (each damaged one
    is reported and skipped); None when there is none at all. A path: that folder, which must
    be a whole checkpoint."""
    if path_or_auto == "auto":
        found = list_checkpoints(output_dir)
        problems = []
        for path in reversed(found):
            reason, counters = _verify(path)
            if reason is None:
                return ResumePoint(path, counters, auto=True)
            problems.append(f"{os.path.basename(path)} ({reason})")
            if report:
                report(f"checkpoint {path} is damaged: {reason}; falling back to the previous one")
        if problems:
            raise UsageError(f"resume_from_checkpoint=auto: no loadable checkpoint in {checkpoint_root(output_dir)}: "
                             f"{'; '.join(problems)}; overwrite_output_dir=true starts over")
        return None
    path = path_or_auto
    if not os.path.isdir(path):
        raise UsageError(f"resume_from_checkpoint={path}: no such folder")
    if not is_complete(path):
        raise UsageError(f"resume_from_checkpoint={path}: not a complete notrainer checkpoint "
                         f"(no {COMPLETE_MARK} mark); pick a checkpoints/step_<N> folder")
    reason, counters = _verify(path)
    if reason is not None:
        raise UsageError(f"resume_from_checkpoint={path}: the checkpoint is damaged ({reason}); pick an older one")
    return ResumePoint(path, counters)


def check_task(path: str, task: str) -> None:
    """A checkpoint of another task cannot be continued by this one."""
    try:
        import yaml

        with open(os.path.join(path, CONFIG_FILE)) as f:
            saved = yaml.safe_load(f) or {}
    except OSError:
        return  # written by the Loop API without a config: nothing to compare
    other = saved.get("task")
    if other is not None and other != task:
        raise UsageError(f"resume_from_checkpoint: {path} is a checkpoint of task={other}, not task={task}; "
                         "resume with the same task or use another output_dir")


def check_model(path: str, model) -> None:
    """The checkpoint's weights must fit the model: same parameter names and shapes."""
    file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(file):
        return  # FSDP / DeepSpeed layouts: accelerate checks them while loading
    saved = _safetensors_shapes(file)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in saved.items():
        if name not in own:
            raise UsageError(f"resume_from_checkpoint: {path} holds another model (it has {name}, this model "
                             "does not); resume with the same model settings or use another output_dir")
        if own[name] != shape:
            raise UsageError(f"resume_from_checkpoint: {path} holds another model shape ({name}: checkpoint "
                             f"{list(shape)}, this model {list(own[name])}); resume with the same model settings "
                             "or use another output_dir")


def _safetensors_shapes(file: str) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ---------------------------------------------------------------------- resuming


def load(acc, model, state: RunState, output_dir: str, path_or_auto: str | ResumePoint | None) -> None:
    """Restore everything a checkpoint holds into the prepared objects and `state` (in place).
    `path_or_auto`: 'auto', a folder, or a ResumePoint already resolved (its files are not read
    again); None: nothing to resume ('auto' found no checkpoint). With 'auto', a checkpoint that
    fails to load (all ranks agree on that) is reported in one line and the previous one is
    tried. `model` is the prepared (wrapped) model."""
    import torch

    point = path_or_auto if isinstance(path_or_auto, ResumePoint) or path_or_auto is None else \
        find_resume(output_dir, path_or_auto, report=acc.print)
    if point is None:
        acc.print(f"resume_from_checkpoint=auto: no checkpoint in {checkpoint_root(output_dir)}, starting fresh")
        return
    candidates = [point.path]
    if point.auto:
        candidates += [p for p in reversed(list_checkpoints(output_dir)) if step_of(p) < step_of(point.path)]
    unwrapped = acc.unwrap_model(model)
    for i, path in enumerate(candidates):
        if i or not point.model_checked:
            check_model(path, unwrapped)
        error = None
        try:
            acc.load_state(path)
        except Exception as e:  # noqa: BLE001 - reported, then the previous checkpoint is tried
            error = first_line(e)
        failed = torch.tensor(float(error is not None), device=acc.device)
        if acc.num_processes > 1:
            failed = acc.reduce(failed, reduction="sum")
        if failed.item() == 0:
            break
        if not point.auto or i == len(candidates) - 1:
            raise UsageError(f"resume_from_checkpoint: {path} could not be loaded ({error or 'on another rank'})")
        acc.print(f"checkpoint {path} could not be loaded ({error or 'on another rank'}); "
                  f"falling back to {candidates[i + 1]}")
    state.data_rng.load(path, acc.process_index)
    state.loader_state = load_loader_state(path, acc.process_index, acc.num_processes)
    if path == point.path:
        state.restore_counters(point.counters)
    else:
        with open(os.path.join(path, STATE_FILE)) as f:
            state.restore_counters(json.load(f))
    state.last_saved = state.counters()
    acc.print(f"resumed from {path} (step {state.global_step}, epoch {state.epoch})")


LOADER_FILE = "loader_state_{}.pt"


def save_loader_state(folder: str, rank: int, loader_state: dict | None) -> None:
    """A stateful (streaming) train loader's position, one file per rank: each rank reads its
    own shards, so each has its own position."""
    if loader_state is None:
        return
    import torch

    torch.save(loader_state, os.path.join(folder, LOADER_FILE.format(rank)))


def load_loader_state(folder: str, rank: int, world_size: int) -> dict | None:
    import torch

    saved = [n for n in os.listdir(folder) if re.fullmatch(LOADER_FILE.format(r"\d+"), n)]
    if saved and len(saved) != world_size:  # each rank's position is in its own part of the data
        raise UsageError(f"resume_from_checkpoint: {folder} holds the streaming data positions of {len(saved)} "
                         f"process(es), this run has {world_size}; resume with {len(saved)}")
    file = os.path.join(folder, LOADER_FILE.format(rank))
    if not os.path.isfile(file):
        return None
    # Plain containers, numbers and strings only (no code): the safe loader reads them.
    return torch.load(file, weights_only=True)


def seed_loader(loader, seed: int | None, epoch: int) -> None:
    """Give a DataLoader its own generator for the worker seed it draws when an iterator starts.

    Without one, torch draws that seed from the global RNG, the stream dropout uses. A resumed
    run starts one iterator more than the uninterrupted run (the skip_first_batches one), after
    the checkpoint, so it would see other dropout masks. Seeded by (seed, epoch), the worker
    seeds are also the same whether or not the epoch was resumed."""
    import torch
    from torch.utils.data import DataLoader

    base = getattr(loader, "base_dataloader", loader)
    if not isinstance(base, DataLoader):
        return
    if base.generator is None:
        base.generator = torch.Generator()
    base.generator.manual_seed((seed or 0) * 1_000_003 + epoch)


# ---------------------------------------------------------------------- the best model


def resolve_metric(name: str | None, greater_is_better: bool | None) -> tuple[str | None, bool]:
    """'loss' -> 'eval_loss'; greater_is_better defaults to False for losses, True otherwise."""
    if not name:
        return None, bool(greater_is_better)
    if not name.startswith("eval_"):
        name = f"eval_{name}"
    if greater_is_better is None:
        greater_is_better = not name.endswith("loss")
    return name, greater_is_better


def update_best(state: RunState, metrics: dict, name: str, greater_is_better: bool, threshold: float = 0.0) -> bool:
    """Record an evaluation of metric `name` in `state`; True when it is the best so far."""
    if name not in metrics:
        known = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float))) or "none"
        raise UsageError(f"metric_for_best_model={name}: the evaluation has no such metric (it has: {known})")
    value = float(metrics[name])
    best = state.best_metric
    if math.isnan(value):
        improved = False
    elif best is None:
        improved = True
    elif greater_is_better:
        improved = value > best + threshold
    else:
        improved = value < best - threshold
    if improved:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
    else:
        state.evals_without_improvement += 1
    return improved


def restore_best(acc, state: RunState, output_dir: str, metric_name: str) -> bool:
    """Load the best checkpoint's state for the export; False when the current weights are
    the best (or no best checkpoint exists)."""
    if state.best_step < 0 or state.best_step == state.global_step:
        return False
    path = best_checkpoint(output_dir, state.best_step)
    if path is None:
        acc.print(f"load_best_model_at_end: no checkpoint of step {state.best_step}; exporting the last weights")
        return False
    acc.print(f"load_best_model_at_end: loading {path} ({metric_name}={state.best_metric:.6g})")
    acc.load_state(path)
    return True


def write_model(model, state_dict: dict, folder: str) -> None:
    """The default export: Hugging Face format when the model has save_pretrained, else
    model.safetensors."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, state_dict=state_dict)
    else:
        from safetensors.torch import save_model

        save_model(model, os.path.join(folder, MODEL_FILE))  # handles tied (shared) tensors


def export_model(acc, model, output_dir: str, write: Callable = write_model) -> None:
    """Save the final model at the top of output_dir: `write(unwrapped_model, full_state_dict,
    folder)` decides what is written (the CLI adds the tokenizer and LoRA's adapter/merged
    folders); every rank takes part, since under ZeRO-3 / FSDP the full weights are gathered here.

    Written into a temporary folder first, then moved into place file by file, so an
    interrupted export never leaves a half-written model.safetensors behind.
    """
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        tmp = os.path.join(output_dir, ".tmp-export")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(acc.unwrap_model(model), state_dict, tmp)
        for name in os.listdir(tmp):
            dest = os.path.join(output_dir, name)
            if os.path.isdir(dest) and not os.path.islink(dest):
                shutil.rmtree(dest)
            os.replace(os.path.join(tmp, name), dest)
        os.rmdir(tmp)
    acc.wait_for_everyone()
