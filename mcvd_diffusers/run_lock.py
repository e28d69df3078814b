"""One process per run folder: training holds its ``output_dir``, evaluation its ``--out``.

The lock is an operating-system file lock (``filelock``) on ``.<folder>.lock`` beside the folder, so that
``overwrite=true`` can delete the folder while it is held, and the system releases it when its process dies:
a lock left by a killed run is simply taken over. Who holds it (pid, host, since when) is written next to it
for the message a second process prints. The empty ``.lock`` file stays when the run ends (deleting it
could let two processes hold two different files of one name).
"""

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


def _lock_files(folder: Path) -> tuple[Path, Path]:
    folder = folder.resolve()
    return folder.parent / f".{folder.name}.lock", folder.parent / f".{folder.name}.lock.json"


@contextlib.contextmanager
def hold_run_folder(folder: str | os.PathLike, what: str, enabled: bool = True):
    """Holds ``folder`` for the ``with`` block or raises RunFolderInUse naming the holder; ``enabled=False``
    (the non-main processes of a multi-process run, which share the main process's folder) holds nothing."""
    if not enabled:
        yield
        return
    lock_path, holder_path = _lock_files(Path(folder))
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
