"""Files that survive a crash (fsync), weight files checked against their SHA-256 (``checksums.json``) and
the tensors a model expects, and a full disk reported as such. Copied into exported pipelines as remote
code: it imports only the standard library and torch."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

CHECKSUMS_FILE = "checksums.json"
_SHOWN = 8  # names listed in an error before "and N more"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes a folder's entries (a rename into it, a deletion) durable."""
    with contextlib.suppress(OSError):  # some filesystems do not allow opening folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flushes every file under ``folder`` to disk, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def write_json_durably(path: str | os.PathLike, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def explain_disk_full(path: str | os.PathLike):
    """Re-raises a failed write under ``path`` as an OSError that names the path and its free space."""
    try:
        yield
    except Exception as e:
        text = str(e).lower()
        # torch's zip writer ("file write failed") and safetensors ("No space left on device (os error 28)")
        # report a full disk as RuntimeError / SafetensorError, not OSError
        if not ((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
                or any(s in text for s in ("no space left", "file write failed", "disk quota"))):
            raise
        probe = Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        raise OSError(errno.ENOSPC, f"could not write {path}: the disk is full or over quota ({free / 2**20:.1f} MiB "
                                    f"free on {probe}); free some space (or point output_dir elsewhere) and "
                                    f"resume. Original error: {type(e).__name__}: {e}") from None


def write_checksums(folder: str | os.PathLike, pattern: str = "**/*.safetensors") -> dict[str, str]:
    """Records the SHA-256 of every weight file under ``folder`` in ``checksums.json``."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.glob(pattern))}
    if not files:
        raise FileNotFoundError(f"{folder} holds no weight file ({pattern}) to record")
    write_json_durably(folder / CHECKSUMS_FILE, {"algorithm": "sha256", "files": files})
    return files


def verify_checksums(folder: str | os.PathLike, pattern: str = "**/*.safetensors") -> bool:
    """Checks the weight files of ``folder`` against its ``checksums.json``; False when it has none.
    A changed, missing or unrecorded weight file is an error naming it."""
    folder = Path(folder)
    record_path = folder / CHECKSUMS_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
        expected = record["files"]
        if record.get("algorithm") != "sha256" or not isinstance(expected, dict):
            raise ValueError("expected {'algorithm': 'sha256', 'files': {path: hex}}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record_path} is corrupt ({e})") from e
    present = {p.relative_to(folder).as_posix() for p in folder.glob(pattern)}
    if missing := set(expected) - present:
        raise FileNotFoundError(f"{folder}: weight files recorded in {CHECKSUMS_FILE} are missing: {_names(missing)}")
    if unrecorded := present - set(expected):
        raise ValueError(f"{folder}: weight files not recorded in {CHECKSUMS_FILE}: {_names(unrecorded)} (a file "
                         "added after the export)")
    for name, digest in sorted(expected.items()):
        if (actual := sha256_file(folder / name)) != digest:
            raise ValueError(f"{folder / name} is corrupt: its SHA-256 is {actual}, {CHECKSUMS_FILE} records "
                             f"{digest} (a damaged download or disk; fetch the file again)")
    return True


def check_tensor_names(source: str, found: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """``found`` / ``expected``: tensor name -> shape. Missing, unexpected or reshaped tensors are an
    error naming them: loading them would leave part of the model randomly initialized."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    reshaped = sorted(n for n in set(found) & set(expected) if tuple(found[n]) != tuple(expected[n]))
    problems = [f"{len(missing)} missing tensor(s): {_names(missing)}"] if missing else []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    if reshaped:
        problems.append("tensor(s) of another shape: " + ", ".join(
            f"{n} {tuple(found[n])} vs {tuple(expected[n])}" for n in reshaped[:_SHOWN]))
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def check_finite(source: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuses weights holding NaN or infinity (a flipped byte, a diverged run), naming the tensors."""
    if bad := [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise ValueError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {_names(bad)}")
