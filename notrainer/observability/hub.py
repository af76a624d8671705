"""`push_to_hub=true hub_model_id=... hub_private_repo=... hub_strategy=...`: share the run.

Two halves, at the two ends of a run:

- `check_push_to_hub(cfg)` runs before anything heavy, on every process: a bad repo id, offline
  mode (`HF_HUB_OFFLINE=1`), no token, or a token the Hub refuses each fail in one line, so a
  run that cannot upload is not trained for hours first.
- `push(output_dir, repo_id, ...)` runs on the main process after the export, the model card
  and the report are written: one `huggingface_hub.upload_folder` commit of the run directory.

`hub_strategy` (the Trainer's names):
    end              the final export only (model, tokenizer, README.md, results, plots, logs)
    every_save       for now the same as `end` (the export only exists at the end)
    checkpoint       also each checkpoint right after it is saved, in `last-checkpoint/`
                     (replacing the previous one: resumable from the Hub)
    all_checkpoints  also each checkpoint as it is saved, under `checkpoints/`
"""

from __future__ import annotations

import os
from typing import Any, Optional

from notrainer.errors import UsageError, first_line

HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
# Never uploaded: half-written checkpoints / files (see checkpoint.py) and local tracker stores.
_ALWAYS_IGNORE = [".tmp-*", "**/.tmp-*", ".old-*", "**/.old-*", "*.tmp", "**/*.tmp", ".*.tmp", "logs/mlflow.db"]


def _truthy(v: Optional[str]) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def offline_variable() -> Optional[str]:
    """The variable that puts this process offline (`HF_HUB_OFFLINE`, or `TRANSFORMERS_OFFLINE`,
    which huggingface_hub and transformers honour too), or None when online. Read at call time
    (huggingface_hub reads its constant once, at import)."""
    from huggingface_hub import constants

    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return "HF_HUB_OFFLINE"
    if _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return "TRANSFORMERS_OFFLINE"
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def is_offline() -> bool:
    return offline_variable() is not None


def default_repo_id(cfg: Any) -> str:
    """hub_model_id, else the run directory's name (the Trainer's default; the Hub puts it in
    the token owner's namespace)."""
    repo = getattr(cfg, "hub_model_id", None)
    if repo:
        return str(repo)
    out = getattr(cfg, "output_dir", None) or "notrainer-model"
    return os.path.basename(os.path.normpath(str(out)))


def check_push_to_hub(cfg: Any, verify_token: bool = True) -> Optional[str]:
    """The repo id to push to, or None when `push_to_hub` is off. Raises UsageError (one line).

    `cfg` is anything with the attributes push_to_hub, hub_model_id, hub_private_repo,
    hub_token, hub_strategy, output_dir (missing ones count as unset).
    """
    if not getattr(cfg, "push_to_hub", False):
        return None
    strategy = getattr(cfg, "hub_strategy", None) or "end"
    if strategy not in HUB_STRATEGIES:
        raise UsageError(f"hub_strategy must be one of {', '.join(HUB_STRATEGIES)}, got {strategy!r}")
    repo_id = default_repo_id(cfg)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"hub_model_id={repo_id!r} is not a valid Hub repo id (name or namespace/name): "
                         f"{first_line(e)}") from None
    if is_offline():
        raise UsageError(f"push_to_hub=true needs the network, but {offline_variable() or 'HF_HUB_OFFLINE'} is set; unset it, "
                         "or drop push_to_hub and upload later with `hf upload`")
    token = resolve_token(cfg)
    if not token:
        raise UsageError("push_to_hub=true needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, "
                         "or pass hub_token=...")
    if verify_token:
        from huggingface_hub import whoami

        try:
            whoami(token=token)
        except Exception as e:  # network down, proxy, revoked token: all end the same way
            raise UsageError(f"push_to_hub=true: cannot reach the Hub with this token: {first_line(e)}") from None
    return repo_id


def resolve_token(cfg: Any) -> Optional[str]:
    from huggingface_hub import get_token

    return getattr(cfg, "hub_token", None) or get_token()


def _ignore_patterns(strategy: str) -> list[str]:
    ignore = list(_ALWAYS_IGNORE)
    if strategy != "all_checkpoints":
        ignore.append("checkpoints/**")
    return ignore


def push(
    output_dir: str,
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    hub_strategy: str = "end",
    commit_message: str = "End of training",
    run_as_future: bool = False,
    last_checkpoint: Optional[str] = None,
):
    """Upload the run directory (the final export and what sits beside it) in one commit.

    Main process only, after the export, README.md and report are written. With
    hub_strategy=checkpoint, pass the newest complete checkpoint as `last_checkpoint`.
    Returns the commit info (or a Future with `run_as_future=True`).
    """
    from huggingface_hub import upload_folder

    repo_id = create(repo_id, private=private, token=token)
    info = upload_folder(repo_id=repo_id, folder_path=output_dir, token=token, commit_message=commit_message,
                         ignore_patterns=_ignore_patterns(hub_strategy), run_as_future=run_as_future)
    if hub_strategy == "checkpoint" and last_checkpoint:
        # Only the newest checkpoint, under a fixed name, so a user can download and resume it.
        push_checkpoint(last_checkpoint, repo_id, token=token, hub_strategy="checkpoint", run_as_future=run_as_future)
    return info


def create(repo_id: str, private: Optional[bool] = None, token: Optional[str] = None) -> str:
    """Create the repo if it does not exist; returns its full id (the Hub fills in the namespace)."""
    from huggingface_hub import create_repo

    return create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id


def push_checkpoint(checkpoint_dir: str, repo_id: str, token: Optional[str] = None, hub_strategy: str = "checkpoint",
                    run_as_future: bool = True):
    """During training (main process, after a checkpoint is complete): upload it in the
    background so the loop does not wait on the network. `every_save` pushes nothing here;
    the loop calls `push(..., run_as_future=True)` for the export-so-far instead."""
    from huggingface_hub import upload_folder

    if hub_strategy == "checkpoint":
        path_in_repo = "last-checkpoint"
        delete = ["last-checkpoint/**"]  # replace the previous one in the same commit
    elif hub_strategy == "all_checkpoints":
        path_in_repo = f"checkpoints/{os.path.basename(os.path.normpath(checkpoint_dir))}"
        delete = None
    else:
        return None
    return upload_folder(repo_id=repo_id, folder_path=checkpoint_dir, path_in_repo=path_in_repo, token=token,
                         commit_message=f"Checkpoint {os.path.basename(os.path.normpath(checkpoint_dir))}",
                         ignore_patterns=list(_ALWAYS_IGNORE), delete_patterns=delete, run_as_future=run_as_future)
