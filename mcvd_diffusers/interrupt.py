"""Stopping training on SIGTERM (a cluster scheduler) or Ctrl-C: the first signal lets the loop finish its
step, save a checkpoint and raise ``TrainingInterrupted`` (exit code 128 + signal); a second exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}. Resume with "
                         "--resume_from_checkpoint latest")


class StopOnSignal:
    """Context manager: while active, SIGTERM/SIGINT set ``signum`` instead of killing the process.
    Only the main thread can install signal handlers; elsewhere it does nothing."""

    def __init__(self):
        self.signum, self._previous = 0, {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum:  # the second signal: the user or scheduler insists
            print(f"\n{name} again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: finishing this step and saving a checkpoint (send it again to exit at once)", file=sys.stderr,
              flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self, accelerator) -> int:
        """The signal number if any process received one (all agree, through Accelerate's trigger), else 0;
        a process that did not receive it reports SIGTERM."""
        if self.signum:
            accelerator.set_trigger()
        return (self.signum or int(signal.SIGTERM)) if accelerator.check_trigger() else 0
