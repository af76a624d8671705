"""Stop cleanly when asked: a scheduler's SIGTERM, SLURM's SIGUSR1 warning, a Ctrl-C.

The handler only raises a flag. The loop reads it at the next optimizer-step boundary (all
ranks agree on it through the per-step all-reduce in `guards.step_flags`), writes a
checkpoint and exits with status EXIT_PREEMPTED, so a job script can requeue the job and
`resume_from_checkpoint=auto` continues exactly where it stopped.

A second signal (more than REPEAT_GRACE_S after the first: launchers such as torchrun forward
the same Ctrl-C a moment later) exits at once, by the signal's default action. Nothing is
corrupted by that: checkpoints, the exported model and all_results.json are written to a
temporary name and renamed, so the run keeps its last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from notrainer.engine.processes import is_rank0

#: Exit status after a signal-triggered checkpoint: sysexits' EX_TEMPFAIL ("try again later").
EXIT_PREEMPTED = 75
#: Signals that ask the run to checkpoint and stop.
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
#: A repeat of the signal within this many seconds is taken as the same request.
REPEAT_GRACE_S = 1.0


class Preempted(SystemExit):
    """Raised by Loop.fit after the checkpoint is written; exits the process with EXIT_PREEMPTED."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopSignal:
    """Installs the handlers for SIGNALS; `received` is the name of the first signal seen."""

    def __init__(self):
        self.received: str | None = None
        self._first_at = 0.0
        self._previous: dict = {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:  # no SIGUSR1 on Windows
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._first_at = name, time.monotonic()
            # os.write, not print: a handler may interrupt a print on the same stream.
            if is_rank0():
                os.write(2, f"\nnotrainer: {name} received: finishing this step, writing a checkpoint, then exiting "
                            f"with status {EXIT_PREEMPTED} (send it again to stop at once)\n".encode())
            return
        if time.monotonic() - self._first_at < REPEAT_GRACE_S:
            return
        os.write(2, f"\nnotrainer: second {name}: stopping now; the last complete checkpoint is kept\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
