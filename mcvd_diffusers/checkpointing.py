"""Training checkpoints: ``checkpoints/checkpoint-<step>`` holds Accelerate's ``save_state`` and, with no pickles,
``ema.safetensors``, ``generator_<rank>.safetensors`` and ``trainer_state.json``: the completion marker, written last
(with every other file's SHA-256) into a ``.partial`` folder renamed when complete, and deleted first on pruning.
Resuming ``latest`` falls back, with a warning, past a checkpoint that does not verify."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .integrity import (check_finite, check_tensor_names, explain_disk_full, fsync_dir, fsync_tree, sha256_file,
                        write_json_durably)

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
GENERATOR_FILE = "generator_{}.safetensors"  # .format(process index)
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints under ``folder`` (a run's ``checkpoints/``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, checkpoints_dir: str | Path) -> tuple[Path, dict] | None:
    """``"latest"`` -> the newest complete checkpoint that verifies (None when there is none; a newer one
    that fails to verify is skipped with a warning naming both); else the folder ``spec``, verified.
    Returns the folder and its trainer state, read once: ``load_checkpoint`` takes both."""
    if spec != "latest":
        path = Path(spec)
        if not (path / STATE_FILE).is_file():
            complete = [p.name for p in list_checkpoints(checkpoints_dir)]
            raise FileNotFoundError(f"{path} is not a complete training checkpoint ({STATE_FILE} is missing); "
                                    f"complete ones under {checkpoints_dir}: {complete}")
        return path, verify_checkpoint(path)
    failures = []
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            state = verify_checkpoint(path)
        except (ValueError, FileNotFoundError, OSError) as e:
            failures.append(f"{path.name}: {e}")
            continue
        if failures:
            warnings.warn(f"resuming from {path} instead of the newer checkpoint(s) that failed to load: "
                          + "; ".join(failures), stacklevel=2)
        return path, state
    if failures:
        raise ValueError(f"no checkpoint under {checkpoints_dir} can be resumed: " + "; ".join(failures))
    return None


def remove_incomplete(checkpoints_dir: Path) -> None:
    """Deletes what interrupted saves and prunes leave: ``.partial``, ``.old`` and unmarked checkpoint folders."""
    for path in list(checkpoints_dir.iterdir()) if checkpoints_dir.is_dir() else []:
        if path.is_dir() and (path.name.endswith((".partial", ".old"))
                              or (_NAME.match(path.name) and not (path / STATE_FILE).is_file())):
            shutil.rmtree(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished folder into place, durably: an existing ``final`` is set aside, then deleted."""
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def register_checkpoint_hooks(accelerator: Accelerator, ema: EMAModel, parameter_names: list[str],
                              generator: torch.Generator) -> None:
    """Makes Accelerate's ``save_state`` write the EMA weights and each process's data-and-noise generator as
    safetensors (``register_for_checkpointing`` would pickle them); ``load_checkpoint`` reads them back."""

    def save_extras(models, weights, output_dir):
        save_file({"state": generator.get_state()},
                  str(Path(output_dir) / GENERATOR_FILE.format(accelerator.process_index)))
        if accelerator.is_main_process:
            save_file({name: p.detach().cpu().contiguous() for name, p in zip(parameter_names, ema.shadow_params)},
                      str(Path(output_dir) / EMA_FILE))

    accelerator.register_save_state_pre_hook(save_extras)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, trainer_state: dict,
                    total_limit: int | None) -> Path:
    """Saves a checkpoint (every process calls this) and prunes the oldest beyond ``total_limit``."""
    final = checkpoints_dir / f"checkpoint-{step}"
    tmp = checkpoints_dir / f".checkpoint-{step}.partial"
    with explain_disk_full(tmp):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            state = {**trainer_state, "step": step, "num_processes": accelerator.num_processes, "files": files}
            write_json_durably(tmp / STATE_FILE, state)  # written last: marks the folder complete
            replace_dir(tmp, final)
            # prune the oldest, each completion marker first: a kill half-way leaves an incomplete folder
            # (removed at the next start), never a half-deleted checkpoint that still looks complete
            if total_limit is not None:
                for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                    (old / STATE_FILE).unlink()
                    fsync_dir(old)
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_step_loss(value) -> bool:
    return isinstance(value, dict) and _is_count(value.get("step")) and _is_number(value.get("loss"))


def validate_trainer_state(state, path: Path) -> dict:
    """Checks the schema of a trainer_state.json; a ValueError names the first wrong entry."""
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a valid trainer state: it must be a JSON object, got {type(state).__name__}")
    history, files = state.get("history"), state.get("files", {})
    h = history if isinstance(history, dict) else {}
    checks = [
        (_is_count(state.get("step")), "'step' must be an integer >= 1"),
        (isinstance(state.get("config"), dict), "'config' must be an object (the TrainConfig)"),
        (isinstance(state.get("data_source"), str), "'data_source' must be a string"),
        (isinstance(state.get("train_digits"), str), "'train_digits' must be a string"),
        (isinstance(state.get("lr_schedule"), dict), "'lr_schedule' must be an object"),
        (isinstance(state.get("ema"), dict), "'ema' must be an object"),
        (_is_count(state.get("num_processes")), "'num_processes' must be an integer >= 1"),
        (isinstance(history, dict), "'history' must be an object"),
        (isinstance(h.get("validations"), list) and all(map(_is_step_loss, h["validations"])),
         "'history.validations' must be a list of {step, loss}"),
        (h.get("best") is None or _is_step_loss(h["best"]), "'history.best' must be null or {step, loss}"),
        (h.get("train_loss") is None or _is_number(h["train_loss"]), "'history.train_loss' must be null or a number"),
        (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()),
         "'files' must map file names to SHA-256 digests"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{path} is not a valid trainer state: {message}")
    return state


def verify_checkpoint(checkpoint: Path) -> dict:
    """Reads and checks a checkpoint before anything is loaded: the trainer state's schema, its step
    against the folder's name, and every file against the SHA-256 recorded when it was saved."""
    checkpoint = Path(checkpoint)
    try:
        state = validate_trainer_state(json.loads((checkpoint / STATE_FILE).read_text()), checkpoint / STATE_FILE)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: {STATE_FILE} is missing") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{checkpoint / STATE_FILE} is corrupt (not valid JSON: {e})") from e
    match = _NAME.match(checkpoint.name)
    if match and int(match.group(1)) != state["step"]:
        raise ValueError(f"{checkpoint / STATE_FILE} records step {state['step']}, but the folder is "
                         f"{checkpoint.name}: one of them was edited or moved")
    for name, digest in state.get("files", {}).items():  # optional: a hand-made state may have no digests
        path = checkpoint / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        if sha256_file(path) != digest:
            raise ValueError(f"{path} is corrupt (its SHA-256 differs from the one recorded when it was saved)")
    return state


def _read_weights(path: Path, expected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, checked against ``expected`` (names, shapes) and for NaN/inf when given."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e})") from e
    if expected is not None:
        check_tensor_names(str(path), {k: tuple(v.shape) for k, v in weights.items()},
                           {k: tuple(v.shape) for k, v in expected.items()})
        check_finite(str(path), weights)
    return weights


def read_ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return _read_weights(Path(checkpoint) / EMA_FILE)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, state: dict, model: torch.nn.Module, ema: EMAModel,
                    parameter_names: list[str], generator: torch.Generator) -> None:
    """Restores what ``save_checkpoint`` wrote from a checkpoint ``resolve_checkpoint`` verified and read (``state``);
    ``model``: the unwrapped model. Missing, unexpected or non-finite tensors are refused before any is loaded."""
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{checkpoint} was written by {state['num_processes']} processes; resume it with the same "
                         f"number (this run has {accelerator.num_processes}): each process has its own data stream")
    checkpoint = Path(checkpoint)
    ema_weights = _read_weights(checkpoint / EMA_FILE, dict(zip(parameter_names, ema.shadow_params)))
    _read_weights(checkpoint / "model.safetensors", model.state_dict())  # Accelerate's copy of the trained weights
    try:
        accelerator.load_state(str(checkpoint))
        generator.set_state(load_file(str(checkpoint / GENERATOR_FILE.format(accelerator.process_index)))["state"])
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"cannot restore {checkpoint}: {e}") from e
    ema.load_state_dict({**state["ema"], "shadow_params": [ema_weights[name] for name in parameter_names]})
    ema.to(accelerator.device)
