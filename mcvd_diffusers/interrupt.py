"""Stopping a training run on SIGTERM or Ctrl-C without losing its steps.

A cluster scheduler sends SIGTERM some time before it kills a job; Ctrl-C sends SIGINT. The
first of either only raises a flag: the loop finishes the step it is in, writes a checkpoint
and stops with ``TrainingInterrupted``; the command line then exits with the conventional
code 128 + signal number (130 for SIGINT, 143 for SIGTERM). A second signal exits at once
(checkpoints are written atomically, so that loses only the steps since the last one).
"""

from __future__ import annotations

import os
import signal
import sys
import threading


SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum:  # the second signal: the user or scheduler insists
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                         "(send it again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, accelerator) -> int:
        """The signal number if any process received one (all processes agree, through Accelerate's
        trigger), else 0; a process that did not receive it reports SIGTERM."""
        if self.signum:
            accelerator.set_trigger()
        if accelerator.check_trigger():
            return self.signum or int(signal.SIGTERM)
        return 0
