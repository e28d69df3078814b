"""Exports: a pipeline folder (safetensors shards, the remote code plain diffusers loads, SHA-256
checksums, training_info.json and the model card) from a training run or a checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusers import DDPMScheduler

from .checkpointing import read_ema_weights, replace_dir, verify_checkpoint
from .config import EXPORT_SAMPLER, TrainConfig, build_noise_scheduler, build_unet
from .hub import write_model_card
from .integrity import check_finite, check_tensor_names, explain_disk_full, write_checksums
from .unet.unet_mcvd import MCVDUNet2DModel
from .pipeline_mcvd import MCVDPipeline
from .remote_code import add_remote_code
from .schedulers import SamplerSpec
from .validation import PREDICTED_FRAMES, can_roll_out

# Exported weights are split into safetensors shards of at most this size, within git hosts' and the Hub's file limits.
MAX_SHARD_SIZE = "10MB"


def training_info(config: TrainConfig, data_source: str, step: int, num_processes: int, history: dict,
                  weights_step: int, val_loss: float | None) -> dict:
    """What an exported pipeline records of its training (training_info.json, the model card)."""
    return {"config": config.to_dict(), "data_source": data_source, "steps": step, "num_processes": num_processes,
            "samples_seen": step * config.batch_size * config.gradient_accumulation_steps * num_processes,
            "final_loss": history["train_loss"], "weights_step": weights_step, "val_loss": val_loss,
            "train_seconds": history.get("train_seconds"), "commands": history.get("commands", []),
            "precision": history.get("precision")}  # as the run resolved mixed_precision (runtime.precision_info)


def save_pipeline(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, destination: Path, info: dict,
                  sampler: SamplerSpec = EXPORT_SAMPLER) -> Path:
    """Saves a pipeline with its model card, atomically, shipping with ``sampler`` (scheduler and default steps)."""
    destination = Path(destination)
    tmp = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shipped = sampler.build(scheduler.config)
    with explain_disk_full(tmp):
        # pipe(past) answers with the 10 frames after the past, whatever the block size (a model that needs
        # future frames fills exactly one block)
        frames = PREDICTED_FRAMES if can_roll_out(unet) else None
        MCVDPipeline(unet=unet, scheduler=shipped, default_num_inference_steps=sampler.steps,
                     default_num_frames=frames).save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        add_remote_code(tmp)  # DiffusionPipeline.from_pretrained(..., trust_remote_code=True) without this package
        write_checksums(tmp)  # from_pretrained verifies them
        info = {**info, "scheduler": f"{type(shipped).__name__} ({sampler.name})", "num_inference_steps": sampler.steps}
        write_model_card(tmp, info, info["config"].get("hub_model_id") or str(destination))
        replace_dir(tmp, destination)
    return destination


def export_checkpoint(checkpoint: str | os.PathLike, destination: str | os.PathLike,
                      export_sampler: str | None = None) -> Path:
    """Exports a training checkpoint's EMA weights as a pipeline folder with its model card, shipping
    with ``export_sampler`` (NAME:STEPS; default: the one of the checkpoint's config)."""
    checkpoint = Path(checkpoint)
    state = verify_checkpoint(checkpoint)
    values = state["config"] if export_sampler is None else {**state["config"], "export_sampler": export_sampler}
    config = TrainConfig.from_dict(values)
    unet = build_unet(config)
    weights = read_ema_weights(checkpoint)
    check_tensor_names(f"{checkpoint}/ema.safetensors", {k: tuple(v.shape) for k, v in weights.items()},
                       {k: tuple(v.shape) for k, v in unet.named_parameters()})
    check_finite(f"{checkpoint}/ema.safetensors", weights)
    unet.load_state_dict(weights)
    history, step = state["history"], state["step"]
    val = next((v["loss"] for v in history["validations"] if v["step"] == step), None)
    info = training_info(config, state["data_source"], step, state["num_processes"], history, step, val)
    return save_pipeline(unet, build_noise_scheduler(config), Path(destination), info, config.export_sampler)
