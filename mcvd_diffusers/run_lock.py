"""One process per run folder: training holds its ``output_dir``, evaluation its ``--out``.

An operating-system file lock (``filelock``) on ``.<folder>.lock`` beside the folder: ``overwrite=true`` can
delete the folder while it is held, and a killed run's lock is released by the system, so simply taken over.
The holder (pid, host, since) is written next to it for the refusal; the ``.lock`` file itself stays."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout


class RunFolderInUse(RuntimeError):
    """Another live process holds the folder."""


@contextlib.contextmanager
def hold_run_folder(folder: str | os.PathLike, what: str, enabled: bool = True):
    """Holds ``folder`` for the ``with`` block or raises RunFolderInUse naming the holder; ``enabled=False``
    (the non-main processes of a multi-process run, which share the main process's folder) holds nothing."""
    if not enabled:
        yield
        return
    resolved = Path(folder).resolve()
    lock_path = resolved.parent / f".{resolved.name}.lock"
    holder_path = lock_path.with_name(lock_path.name + ".json")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(holder_path.read_text())
            who = f"{holder['what']} (pid {holder['pid']} on {holder['host']}, since {holder['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process (it has not yet said which)"
        raise RunFolderInUse(f"{folder} is in use by {who}; wait for it to finish or use another folder") from None
    try:
        holder_path.write_text(json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                                           "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        yield
    finally:
        with contextlib.suppress(OSError):
            holder_path.unlink()
        lock.release()
