"""Training checkpoints: written atomically, found by step, resumed exactly.

A checkpoint folder ``checkpoints/checkpoint-<step>`` holds Accelerate's ``save_state``
(model as safetensors, optimizer, GradScaler, Python/NumPy/torch RNG states per process),
plus our own state, with no pickles: ``ema.safetensors`` (EMA weights), one
``generator_<rank>.safetensors`` per process (the data-and-noise generator), and
``trainer_state.json`` (step, config, LR schedule, EMA counters, validation history).

It is written to ``.checkpoint-<step>.partial``, flushed to disk (files, then folders) and
renamed when complete, so a run killed or cut from power while saving leaves the previous
checkpoints intact and only complete ones are ever resumed. ``trainer_state.json`` is the
completion marker: written last, with the SHA-256 of every other file of the checkpoint, and
removed first when a checkpoint is pruned. Resuming ``latest`` takes the newest checkpoint
that verifies, and falls back, with a warning, past one that does not.
"""

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
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _generator_file(rank: int) -> str:
    return f"generator_{rank}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints under ``folder`` (a run's ``checkpoints/``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
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
    found = list_checkpoints(checkpoints_dir)
    failures = []
    for path in reversed(found):
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


def remove_incomplete(checkpoints_dir: Path) -> list[Path]:
    """Deletes what interrupted saves and prunes leave behind: ``.partial`` folders, set-aside ``.old``
    ones and checkpoint folders without their completion marker. Returns what it removed."""
    if not checkpoints_dir.is_dir():
        return []
    leftovers = [p for p in checkpoints_dir.iterdir() if p.is_dir() and (
        p.name.endswith((".partial", ".old")) or (_NAME.match(p.name) and not (p / STATE_FILE).is_file()))]
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished folder into place, durably. The rename is atomic; an existing ``final`` is set
    aside first and deleted after."""
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune(checkpoint: Path) -> None:
    """Deletes a checkpoint, its completion marker first: a kill half-way leaves an incomplete folder
    (removed at the next start), never a half-deleted checkpoint that still looks complete."""
    (checkpoint / STATE_FILE).unlink()
    fsync_dir(checkpoint)
    shutil.rmtree(checkpoint)


def register_checkpoint_hooks(accelerator: Accelerator, ema: EMAModel, parameter_names: list[str],
                              generator: torch.Generator) -> None:
    """Makes Accelerate's ``save_state``/``load_state`` carry the EMA weights and each process's
    data-and-noise generator, as safetensors (Accelerate's own ``register_for_checkpointing`` would
    pickle them). The EMA counters and the LR schedule are plain JSON in ``trainer_state.json``."""

    def save_extras(models, weights, output_dir):
        save_file({"state": generator.get_state()}, str(Path(output_dir) / _generator_file(accelerator.process_index)))
        if accelerator.is_main_process:
            save_file({name: p.detach().cpu().contiguous() for name, p in zip(parameter_names, ema.shadow_params)},
                      str(Path(output_dir) / EMA_FILE))

    def load_extras(models, input_dir):
        state = read_trainer_state(Path(input_dir))
        weights = read_ema_weights(Path(input_dir))
        ema.load_state_dict({**state["ema"], "shadow_params": [weights[name] for name in parameter_names]})
        ema.to(accelerator.device)
        generator.set_state(load_file(str(Path(input_dir) / _generator_file(accelerator.process_index)))["state"])

    accelerator.register_save_state_pre_hook(save_extras)
    accelerator.register_load_state_pre_hook(load_extras)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, trainer_state: dict,
                    total_limit: int | None) -> Path:
    """Saves a checkpoint (every process calls this; the hooks of ``register_checkpoint_hooks`` add the
    EMA and the generators) and prunes the oldest beyond ``total_limit``."""
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
            if total_limit is not None:
                for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                    prune(old)
    accelerator.wait_for_everyone()
    return final


_NUMBER = (int, float)


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def validate_trainer_state(state, path: Path) -> dict:
    """Checks the schema of a trainer_state.json; a ValueError names the first wrong entry."""
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a valid trainer state: it must be a JSON object, got {type(state).__name__}")
    history = state.get("history")
    checks = [
        (_is_int(state.get("step"), 1), "'step' must be an integer >= 1"),
        (isinstance(state.get("config"), dict), "'config' must be an object (the TrainConfig)"),
        (isinstance(state.get("data_source"), str), "'data_source' must be a string"),
        (isinstance(state.get("train_digits"), str), "'train_digits' must be a string"),
        (isinstance(state.get("lr_schedule"), dict), "'lr_schedule' must be an object"),
        (isinstance(state.get("ema"), dict), "'ema' must be an object"),
        (_is_int(state.get("num_processes"), 1), "'num_processes' must be an integer >= 1"),
        (isinstance(history, dict), "'history' must be an object"),
        (isinstance(history, dict) and isinstance(history.get("validations"), list)
         and all(isinstance(v, dict) and _is_int(v.get("step"), 1) and _is_number(v.get("loss"))
                 for v in history["validations"]),
         "'history.validations' must be a list of {step, loss}"),
        (isinstance(history, dict) and (history.get("best") is None or (
            isinstance(history["best"], dict) and _is_int(history["best"].get("step"), 1)
            and _is_number(history["best"].get("loss")))), "'history.best' must be null or {step, loss}"),
        (isinstance(history, dict) and (history.get("train_loss") is None or _is_number(history["train_loss"])),
         "'history.train_loss' must be null or a number"),
        ("files" not in state or (isinstance(state["files"], dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in state["files"].items())),
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
    state = read_trainer_state(checkpoint)
    match = _NAME.match(checkpoint.name)
    if match and int(match.group(1)) != state["step"]:
        raise ValueError(f"{checkpoint / STATE_FILE} records step {state['step']}, but the folder is "
                         f"{checkpoint.name}: one of them was edited or moved")
    for name, digest in state.get("files", {}).items():  # checkpoints of older versions have no digests
        path = checkpoint / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        if sha256_file(path) != digest:
            raise ValueError(f"{path} is corrupt (its SHA-256 differs from the one recorded when it was saved)")
    return state


def read_trainer_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        return validate_trainer_state(json.loads(path.read_text()), path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: {STATE_FILE} is missing") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt (not valid JSON: {e})") from e


def read_ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = Path(checkpoint) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: {EMA_FILE} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e})") from e


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, state: dict, model: torch.nn.Module, ema: EMAModel,
                    parameter_names: list[str]) -> None:
    """Restores everything ``save_checkpoint`` wrote (``model``: the unwrapped model; the EMA and the
    generator through the hooks) from a checkpoint ``resolve_checkpoint`` verified and read (``state``).
    Tensors that are missing, unexpected or non-finite are refused before any is loaded."""
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{checkpoint} was written by {state['num_processes']} processes; resume it with the same "
                         f"number (this run has {accelerator.num_processes}): each process has its own data stream")
    weights = read_ema_weights(checkpoint)
    check_tensor_names(f"{checkpoint}/{EMA_FILE}", {k: tuple(v.shape) for k, v in weights.items()},
                       {n: tuple(p.shape) for n, p in zip(parameter_names, ema.shadow_params)})
    check_finite(f"{checkpoint}/{EMA_FILE}", weights)
    model_file = Path(checkpoint) / "model.safetensors"  # Accelerate's copy of the trained weights
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} is missing")
    try:
        saved = load_file(str(model_file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{model_file} is corrupt or truncated ({e})") from e
    check_tensor_names(str(model_file), {k: tuple(v.shape) for k, v in saved.items()},
                       {k: tuple(v.shape) for k, v in model.state_dict().items()})
    check_finite(str(model_file), saved)
    generator_path = Path(checkpoint) / _generator_file(accelerator.process_index)
    if not generator_path.is_file():
        raise FileNotFoundError(f"{checkpoint}: {generator_path.name} is missing")
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"cannot restore {checkpoint}: {e}") from e
