"""Training checkpoints: written atomically, found by step, resumed exactly.

A checkpoint folder ``checkpoints/checkpoint-<step>`` holds Accelerate's ``save_state``
(model as safetensors, optimizer, GradScaler, Python/NumPy/torch RNG states per process),
plus our own state, with no pickles: ``ema.safetensors`` (EMA weights), one
``generator_<rank>.safetensors`` per process (the data-and-noise generator), and
``trainer_state.json`` (step, config, LR schedule, EMA counters, validation history).

It is written to ``.checkpoint-<step>.partial`` and renamed when complete, so a run killed
while saving leaves the previous checkpoints intact and only complete ones are ever resumed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


def resolve_checkpoint(spec: str, checkpoints_dir: str | Path) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint (None when there is none); else a folder path."""
    if spec == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        complete = [p.name for p in list_checkpoints(checkpoints_dir)]
        raise FileNotFoundError(f"{path} is not a complete training checkpoint ({STATE_FILE} is missing); "
                                f"complete ones under {checkpoints_dir}: {complete}")
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished folder into place. The rename is atomic; an existing ``final`` is set
    aside first and deleted after."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, ema: EMAModel,
                    parameter_names: list[str], generator: torch.Generator, trainer_state: dict,
                    total_limit: int | None) -> Path:
    """Saves a checkpoint (every process calls this) and prunes the oldest beyond ``total_limit``."""
    final = checkpoints_dir / f"checkpoint-{step}"
    tmp = checkpoints_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    save_file({"state": generator.get_state()}, str(tmp / _generator_file(accelerator.process_index)))
    if accelerator.is_main_process:
        save_file({name: p.detach().cpu().contiguous() for name, p in zip(parameter_names, ema.shadow_params)},
                  str(tmp / EMA_FILE))
        ema_counters = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        state = {**trainer_state, "step": step, "ema": ema_counters, "num_processes": accelerator.num_processes}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks the folder complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, ema: EMAModel, parameter_names: list[str],
                    generator: torch.Generator) -> dict:
    """Restores everything ``save_checkpoint`` wrote; returns the trainer state."""
    state = read_trainer_state(checkpoint)
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{checkpoint} was written by {state['num_processes']} processes; resume it with the same "
                         f"number (this run has {accelerator.num_processes}): each process has its own data stream")
    weights = read_ema_weights(checkpoint)
    if sorted(weights) != sorted(parameter_names):
        raise ValueError(f"{checkpoint}/{EMA_FILE} does not match the model: its parameters differ")
    generator_path = Path(checkpoint) / _generator_file(accelerator.process_index)
    if not generator_path.is_file():
        raise FileNotFoundError(f"{checkpoint}: {generator_path.name} is missing")
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"cannot restore {checkpoint}: {e}") from e
    ema.load_state_dict({**state["ema"], "shadow_params": [weights[name] for name in parameter_names]})
    ema.to(accelerator.device)
    generator.set_state(load_file(str(generator_path))["state"])
    return state
