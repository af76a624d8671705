"""The command line: `accelerate launch -m notrainer.run task=clm key=value ...`.

Order of work, every check before anything heavy:
parse and validate the config -> check output_dir -> load raw data -> tokenizer -> model ->
task checks -> tokenize -> dataloaders, optimizer, schedule -> Loop.fit() -> export.
A mistake the user can fix is a `UsageError`: one line on stderr, exit status 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from typing import Any, Optional

from notrainer.errors import UsageError

# bitsandbytes (imported by peft whenever it is installed) asks the `kernels` package for a Hub
# kernel at import, on CPUs with AVX512-BF16, and logs a warning when it cannot have one: that
# `kernels` is missing (bitsandbytes' logger) or, with `kernels` installed (transformers >= 5.25
# requires it) and the Hub offline, that the publisher trust check was skipped (kernels' logger).
# Either is a stray stderr line in every run and in front of our one-line errors. notrainer
# itself loads models with `use_kernels=False`, so nothing it asks for is lost by quieting them.
for _noisy in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    """Train (evaluate, predict) with `key=value ...` settings; returns the exit status.
    The `notrainer` command's sub-commands are dispatched before this (notrainer/cli/main.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from notrainer.engine.guards import EXIT_DIVERGED, TrainingDiverged
    from notrainer.engine.preemption import EXIT_PREEMPTED, Preempted

    from notrainer.engine.processes import is_rank0, teardown

    status, message, every_rank = 0, None, False
    try:
        run(argv)
    except UsageError as e:
        status, message = EXIT_USAGE, f"notrainer: error: {e}"
        every_rank = getattr(e, "every_rank", False)
    except TrainingDiverged as e:  # non-finite losses: the last good checkpoint is kept
        status, message = EXIT_DIVERGED, f"notrainer: error: {e}"
    except Preempted as e:  # a signal asked us to stop: checkpoint written, requeue the job
        status, message = EXIT_PREEMPTED, f"notrainer: {e}"
    except BaseException as e:
        # The traceback's frames still hold the loop (the wrapped model holds the process
        # group): drop their locals, or the group's destructor runs at interpreter exit, where
        # gloo can hang. The traceback still prints (it needs code and line numbers only).
        import traceback

        traceback.clear_frames(e.__traceback__)
        teardown(all_ranks_done=False)
        raise
    # Only a finished run is known to have brought every rank here; after an error a rank may
    # still be elsewhere, so nothing waits for the others then.
    teardown(all_ranks_done=status == 0)
    # A data shard that broke mid-stream is known only to the rank that read it (ShardError).
    if message and (is_rank0() or every_rank):
        print(message, file=sys.stderr)
    return status


# ---------------------------------------------------------------------- the task registry

#: built-in task name -> "module:Class"
BUILTIN_TASKS = {
    "clm": "notrainer.tasks.clm:CLMTask",
    "sft": "notrainer.tasks.sft:SFTTask",
    "mlm": "notrainer.tasks.mlm:MLMTask",
    "classification": "notrainer.tasks.classification:ClassificationTask",
    "token_classification": "notrainer.tasks.token_classification:TokenClassificationTask",
    "seq2seq": "notrainer.tasks.seq2seq:Seq2SeqTask",
    "qa": "notrainer.tasks.qa:QATask",
    "reward": "notrainer.tasks.reward:RewardTask",
    "dpo": "notrainer.tasks.dpo:DPOTask",
    "image_classification": "notrainer.tasks.image_classification:ImageClassificationTask",
    "semantic_segmentation": "notrainer.tasks.semantic_segmentation:SemanticSegmentationTask",
    "multiple_choice": "notrainer.tasks.multiple_choice:MultipleChoiceTask",
}


def resolve_task(name: str):
    """A task name or 'module:Class' spec -> the Task subclass."""
    from notrainer.errors import check
    from notrainer.imports import import_object
    from notrainer.tasks.base import Task

    if name in BUILTIN_TASKS:
        spec = BUILTIN_TASKS[name]
    elif ":" in name:
        spec = name
    else:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTIN_TASKS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"unknown task {name!r}{hint}; built-in tasks: {', '.join(BUILTIN_TASKS)}, "
                         "or 'pkg.module:Class' / 'path/file.py:Class' for your own")
    cls = import_object(spec, "task")
    check(isinstance(cls, type) and issubclass(cls, Task),
          f"task={name!r}: {spec} is not a subclass of notrainer.tasks.base.Task")
    return cls


def parse_args(argv: list[str] | None = None):
    """`key=value` arguments (and an optional `config=file.yaml`) -> (config, task class).
    Prints help and exits when asked with --help."""
    from notrainer.config import help_text, make_config, read_argv, requested_task

    pairs, file_cfg, want_help = read_argv(argv)
    name = requested_task(pairs, file_cfg)
    task_cls = resolve_task(name)
    if want_help:
        print(help_text(task_cls.Config, task_cls))
        raise SystemExit(0)
    cfg = make_config(task_cls.Config, pairs, file_cfg, name, task_cls.embedded_defaults,
                      data_length_keys=getattr(task_cls, "data_length_keys", ()))
    if cfg.streaming and not task_cls.supports_streaming:
        raise UsageError(f"streaming=true: task={name} cannot stream (clm, sft and mlm can); remove streaming=true")
    return cfg, task_cls


def check_output_dir(cfg):
    """Never silently mix a new run into an old one, and never delete without being asked.
    Returns the checkpoint to resume from (resolved and verified here, once), or None."""
    from notrainer.engine.checkpoint import check_run_folder, check_task, checkpoint_root, find_resume, list_checkpoints
    from notrainer.engine.processes import is_rank0

    out = cfg.output_dir
    check_run_folder(out)  # an existing file, a path under a file, no write permission
    if cfg.resume_from_checkpoint:  # a bad path fails here, before anything runs
        point = find_resume(out, cfg.resume_from_checkpoint, report=print if is_rank0() else None)
        if point is not None:
            check_task(point.path, cfg.task)
        return point
    has_run = bool(list_checkpoints(out)) or os.path.isfile(os.path.join(out, "all_results.json"))
    if has_run and cfg.do_train:
        if not cfg.overwrite_output_dir:
            raise UsageError(f"output_dir={out} already holds a run: resume_from_checkpoint=auto continues it, "
                             "overwrite_output_dir=true starts over, or pick another output_dir")
        from notrainer.engine.processes import is_rank0

        if is_rank0():
            shutil.rmtree(checkpoint_root(out), ignore_errors=True)
    return None


def check_distributed(acc) -> None:
    """Launch set-ups that would fail late or silently, refused before anything is built."""
    # torchrun/accelerate started N processes but accelerate sees one (on CPU without
    # ACCELERATE_USE_CPU=1): N independent runs would race on output_dir.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise UsageError(f"{launched} processes were launched but accelerate sees {acc.num_processes}; "
                         "on CPU, launch with ACCELERATE_USE_CPU=1 (see docs/distributed.md)")
    # A DeepSpeed/FSDP launch file that accelerate did not turn into that engine (ACCELERATE_USE_CPU=1
    # with a DeepSpeed recipe runs plain DDP): the memory savings the user chose would silently vanish.
    from accelerate.utils import DistributedType

    for env, engine, how in (("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED,
                              "on CPU set DS_ACCELERATOR=cpu and unset ACCELERATE_USE_CPU"),
                             ("ACCELERATE_USE_FSDP", DistributedType.FSDP,
                              "on CPU set ACCELERATE_USE_CPU=1 and fsdp_version: 2")):
        # (one process: accelerate may legitimately run no engine, e.g. FSDP on one GPU)
        if os.environ.get(env, "false").lower() == "true" and acc.num_processes > 1 and acc.distributed_type != engine:
            raise UsageError(f"a {engine.value} launch file but accelerate runs {acc.distributed_type.value}; "
                             f"{how} (see docs/distributed.md)")
    # ZeRO-3 shards every weight: the final export can only gather them with this setting.
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None and ds.zero_stage == 3 and not ds.zero3_save_16bit_model:
        raise UsageError("DeepSpeed ZeRO-3 without zero3_save_16bit_model (stage3_gather_16bit_weights_on_model_save) "
                         "cannot export the final model; set it to true (see launch/deepspeed_zero3.yaml)")


def settle_mixed_precision(cfg, acc) -> None:
    """One source of truth: the precision accelerate runs (the key, else the launch file or
    `accelerate config`) is written back into cfg before the task is built (the tasks read it:
    chunked-loss dtype, padding multiple) and so into config.yaml."""
    launch = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    # A launch file only says something when it asks for fp16/bf16 ("no" is also what
    # `accelerate launch` sets when nothing was configured), and then the key must agree.
    if cfg.mixed_precision is not None and launch in ("fp16", "bf16") and cfg.mixed_precision != launch:
        raise UsageError(f"mixed_precision={cfg.mixed_precision} but the launch file (or accelerate config) says "
                         f"{launch}; drop one of them")
    cfg.mixed_precision = acc.mixed_precision


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run derives from its config, resolved once (`plan`): the frozen config (output_dir,
    accumulation for an elastic resume, mixed precision and mode settled in it), the accelerator,
    the checkpoint to resume from (read once: nothing reads its files again) and the Hub repo."""

    cfg: Any
    accelerator: Any
    resume: Any = None  # notrainer.engine.checkpoint.ResumePoint
    repo_id: Optional[str] = None


def plan(cfg) -> Plan:
    """Resolve everything derived, in order, before anything heavy; then freeze the config
    (assigning to it raises) so every later step sees one settled run."""
    from notrainer.engine.accelerator import make_accelerator
    from notrainer.engine.elastic import plan as elastic_plan
    from notrainer.engine.processes import is_rank0
    from notrainer.modeling.optim import resolve_optim
    from notrainer.observability.hub import check_push_to_hub

    cfg.output_dir = cfg.resolved_output_dir()
    resume = check_output_dir(cfg)
    repo_id = check_push_to_hub(cfg)  # offline, no token, bad repo id: one line, before anything heavy
    if resume is not None:  # another process count: keep the checkpoint's global batch
        note = elastic_plan(cfg, resume.path, int(os.environ.get("WORLD_SIZE", "1")), saved=resume.layout)
        if note and is_rank0():
            print(note, file=sys.stderr)
    acc = make_accelerator(cfg)
    check_distributed(acc)
    settle_mixed_precision(cfg, acc)
    resolve_optim(cfg, acc)  # optim's default follows the engine (ZeRO offload: DeepSpeedCPUAdam)
    cfg.freeze()
    return Plan(cfg, acc, resume, repo_id)


def build(cfg, task_cls):
    """Everything `fit` needs, built in order after the run is planned: returns (loop, task)."""
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from notrainer.config import save_yaml, to_dict
    from notrainer.engine.loop import Loop
    from notrainer.engine.prepare import local_share, prepare_frozen
    from notrainer.modeling import adapter_checkpoints
    from notrainer.modeling.lora import apply_lora, is_peft_model
    from notrainer.modeling.peft_methods import wants_merge
    from notrainer.modeling.optim import build_optimizer, scheduler_factory
    from notrainer.data.streaming import stream_loader

    planned = plan(cfg)
    acc, resume = planned.accelerator, planned.resume
    set_seed(cfg.seed)
    task = task_cls(cfg)
    if cfg.do_predict and not task.has_prediction_mode():  # say so before training, not after
        raise UsageError(f"task={task.name} has no prediction mode (do_predict=true); it writes no predictions.jsonl")
    # data files but none to train on (the built-in data is used only without any data key)
    if cfg.do_train and not (cfg.train_file or cfg.dataset_name) and (cfg.validation_file or cfg.test_file):
        raise UsageError("do_train=true needs training data: give train_file=... (to evaluate or predict with a "
                         "trained model instead: mode=eval or mode=predict with model_name_or_path=...)")

    # Data files are read (and cached) by the main process first; the others reuse its cache.
    with acc.main_process_first():
        raw = task.load_raw_datasets()
    tokenizer = task.build_processor(raw)  # a tokenizer, an image processor or both (tasks/base.py)
    model = task.build_model(tokenizer)
    task.setup(model, tokenizer)  # the task lifecycle: see tasks/base.py
    model = apply_lora(model, cfg, task)  # lora.r > 0: only peft adapters (and the task's new head) train
    base = None
    if is_peft_model(model):  # checkpoints hold the adapters only; the frozen base is referenced
        base = adapter_checkpoints.base_identity(model, cfg)
        adapter_checkpoints.register(acc, base)
    if resume is not None:  # another model shape fails here, before output_dir is touched
        from notrainer.engine.checkpoint import check_model

        check_model(resume.path, model)
        resume = dataclasses.replace(resume, model_checked=True)
        if base is not None:
            adapter_checkpoints.check_base(resume.path, base)
    # streaming: raw["train"] is only a sample of the stream (data.raw.load_streaming_raw); the
    # training items are tokenized on the fly by task.train_stream, the other splits here.
    streaming = cfg.streaming and cfg.do_train
    to_prepare = {k: v for k, v in raw.items() if k != "train"} if streaming else raw
    with acc.main_process_first():
        ds = task.prepare_datasets(type(raw)(to_prepare), tokenizer) if to_prepare else {}

    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UsageError(f"gradient_checkpointing=true: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False

    collate = task.collator(tokenizer)

    def loader(split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        # pinned host memory lets accelerate copy batches to the GPU without blocking
        return DataLoader(ds[split], shuffle=shuffle, batch_size=batch_size, collate_fn=collate,
                          num_workers=cfg.dataloader_num_workers, pin_memory=torch.cuda.is_available())

    train_loader = eval_loader = predict_loader = None
    if cfg.do_train:
        if "train" not in ds and not streaming:
            raise UsageError("do_train=true but there is no training data")
        train_loader = loader("train", cfg.per_device_train_batch_size, shuffle=True) if not streaming else \
            stream_loader(task.train_stream(raw, tokenizer, acc.process_index, acc.num_processes),
                          cfg.per_device_train_batch_size, collate_fn=collate, num_workers=cfg.dataloader_num_workers,
                          pin_memory=torch.cuda.is_available())
        if streaming and cfg.do_eval and "validation" not in ds:
            acc.print("streaming: no validation_file, so this run does not evaluate")
    if cfg.do_eval and "validation" in ds:
        eval_loader = loader("validation", cfg.per_device_eval_batch_size)
    if cfg.do_predict:
        if "test" not in ds:
            raise UsageError("do_predict=true needs test_file=... (the data to predict on)")
        predict_loader = loader("test", cfg.per_device_eval_batch_size)

    if acc.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))

    optimizer = build_optimizer(model, cfg, acc.device, acc)
    loop = Loop(model, optimizer, train_loader if train_loader is not None else [], config=cfg, accelerator=acc,
                loss_fn=task.loss, num_items_fn=task.num_items, num_tokens_fn=task.num_tokens,
                eval_fn=task.eval_step, metrics_fn=task.compute_metrics, eval_loader=eval_loader,
                predict_loader=predict_loader, scheduler=scheduler_factory(cfg, acc),
                export=export_policy(tokenizer, output_dir=cfg.output_dir, merge_lora=wants_merge(cfg)),
                run_config=to_dict(cfg), resume=resume, events=run_events(cfg, planned.repo_id))
    for name, frozen in task.frozen_models().items():  # after the trained model: the engine's config is complete
        setattr(task, name, prepare_frozen(acc, frozen))
        acc.print(f"frozen model {name.strip('_')}: {local_share(getattr(task, name)):.0%} of its weights on each process")
    return loop, task


def export_policy(tokenizer, output_dir: str, merge_lora: bool):
    """What the CLI's final export writes: the model (a LoRA adapter folder, plus merged/ with
    lora.merge=true), and the tokenizer beside it."""
    from notrainer.modeling import lora
    from notrainer.engine.checkpoint import write_model

    def write(model, state_dict: dict, folder: str) -> None:
        if lora.is_peft_model(model):
            lora.export(model, state_dict, folder, merge=merge_lora, tokenizer=tokenizer, final_dir=output_dir)
        else:
            write_model(model, state_dict, folder)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)

    return write


class PushCheckpoints:
    """Loop event for hub_strategy=checkpoint / all_checkpoints: on the main process, each
    complete checkpoint is uploaded right after it is saved. The upload is not left running in
    the background: retention (save_total_limit) may delete that folder at the next save."""

    def __init__(self, cfg, repo_id: str):
        self.cfg, self.repo_id, self.repo, self.commits = cfg, repo_id, None, []

    def on_checkpoint_saved(self, loop, path: str) -> None:
        if not loop.accelerator.is_main_process:
            return
        from notrainer.observability import hub

        token = hub.resolve_token(self.cfg)
        if self.repo is None:
            self.repo = hub.create(self.repo_id, private=self.cfg.hub_private_repo, token=token)
        self.commits.append(hub.push_checkpoint(path, self.repo, token=token, hub_strategy=self.cfg.hub_strategy,
                                                run_as_future=False))


class FinishRun:
    """Loop event at the end of a finished run, on the main process: the model card (README.md),
    the report (plots and report.html; skipped with one line without matplotlib), then the Hub
    upload (checkpoints already uploaded as they were saved are not uploaded again)."""

    def __init__(self, cfg, repo_id: str | None, pushed: PushCheckpoints | None = None):
        self.cfg, self.repo_id, self.pushed = cfg, repo_id, pushed

    def on_train_end(self, loop, results: dict) -> None:
        if not loop.accelerator.is_main_process:
            return
        from notrainer.config import to_dict
        from notrainer.observability import report
        from notrainer.observability.model_card import write_model_card

        cfg = self.cfg
        write_model_card(cfg.output_dir, to_dict(cfg), results=results)
        report.maybe_write_report(cfg.output_dir, log=loop.accelerator.print)
        if self.repo_id:
            from notrainer.engine.checkpoint import list_checkpoints
            from notrainer.observability import hub

            done = list_checkpoints(cfg.output_dir)
            pending = self.pushed is not None and self.pushed.commits
            info = hub.push(cfg.output_dir, self.repo_id, private=cfg.hub_private_repo, token=hub.resolve_token(cfg),
                            hub_strategy="end" if pending else cfg.hub_strategy,
                            last_checkpoint=done[-1] if done and not pending else None)
            loop.accelerator.print(f"pushed to the Hub: {getattr(info, 'commit_url', info)}")


def run_events(cfg, repo_id: str | None) -> list:
    """The run-level features the CLI attaches to the loop (notrainer/engine/events.py)."""
    pushed = PushCheckpoints(cfg, repo_id) if repo_id and cfg.hub_strategy in ("checkpoint", "all_checkpoints") \
        else None
    from notrainer.cli.hf_scripts import ScriptResults  # perplexity, eval_exact, ... beside our names

    return [e for e in (ScriptResults(cfg.task), pushed, FinishRun(cfg, repo_id, pushed)) if e is not None]


def run(argv: list[str] | None = None) -> dict:
    cfg, task_cls = parse_args(argv)
    loop, task = build(cfg, task_cls)  # plans the run first (then cfg is frozen)
    if cfg.do_train:
        results = loop.fit()  # model card, report and Hub upload are loop events (run_events)
    else:  # do_eval alone evaluates the given model
        results = loop.evaluate() if cfg.do_eval else {}
        loop.results.update(results)
        from notrainer.cli.hf_scripts import script_results

        loop.results.update(script_results(cfg.task, loop.results))
        loop.write_results()
    if cfg.do_predict:
        from notrainer.cli.predict import write_predictions

        write_predictions(loop, task)
    return results


if __name__ == "__main__":
    sys.exit(main())
