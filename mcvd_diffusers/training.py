"""Training: the config, the diffusion loss, validation and the loop behind train_mcvd.py.

The loop draws fresh Moving MNIST clips from MNIST train digits every step, on the training
device, applies MCVD's masking, validates the EMA weights on clips made from MNIST
*validation* digits with fixed noise and timesteps, checkpoints atomically (exact resume),
and exports an ``MCVDPipeline`` with the best EMA weights and a model card.

Run folder (``output_dir``)::

    checkpoints/checkpoint-<step>/   Accelerate state + EMA + generators + trainer_state.json
    best/                            pipeline of the lowest validation loss so far
    pipeline/                        the export: best weights (or the last, without validation) + README.md
    samples/step-<step>.gif          past | ground truth | prediction on fixed validation clips
    logs/                            TensorBoard
    train_summary.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm

from .checkpointing import (list_checkpoints, load_checkpoint, read_ema_weights, read_trainer_state, remove_incomplete,
                            replace_dir, resolve_checkpoint, save_checkpoint, verify_checkpoint)
from .integrity import check_finite, check_tensor_names, explain_disk_full, write_checksums
from .interrupt import StopOnSignal, TrainingInterrupted
from .data.mnist import MNISTDigits, load_mnist
from .data.moving_mnist import MOTIONS, MovingMNIST, digits_fingerprint
from .hub import push_to_hub, write_model_card
from .lr_schedules import LR_SCHEDULES, make_lr_schedule
from .masking import draw_keep_mask
from .models.unet_mcvd import PRESETS, MCVDUNet2DModel
from .pipeline_mcvd import MCVDPipeline
from .remote_code import add_remote_code
from .runtime import check_precision, maybe_compile, to_channels_last
from .schedulers import BETA_SCHEDULES, PREDICTION_TYPES, make_noise_scheduler, make_sampler, parse_sampler

# The sampler an exported pipeline ships with unless the config names another (export_sampler), so that
# pipe(past) samples well as it comes: on the quickstart model DDIM-50 (trailing, x0 clipped) beat
# DPM-Solver++-20 (MSE 0.050 vs 0.066).
EXPORT_SAMPLER = "ddim:50"
VALIDATION_SEED = 1234
# Exported weights are split into safetensors shards of at most this size (diffusers' sharded format,
# which from_pretrained reads back): each file fits git hosts' and the Hub's per-file limits.
MAX_SHARD_SIZE = "10MB"


@dataclass
class TrainConfig:
    """Every training option. Configs are plain YAML/JSON dicts of these keys."""

    # model: a preset from models/unet_mcvd.py and MCVD's frame layout
    preset: str = "tiny"
    num_past_frames: int = 5
    num_current_frames: int = 10
    num_future_frames: int = 0  # > 0: future-conditioning slots (interpolation)
    prob_mask_past: float = 0.0  # MCVD masking: > 0 also teaches unconditional generation
    prob_mask_future: float = 0.0  # > 0 lets an interpolation model also predict
    patch_size: int | None = None  # space-to-depth factor of the UNet's input; None: the preset's
    block_out_channels: list[int] | None = None  # the UNet's width per level; None: the preset's
    # data: Moving MNIST drawn fresh each step from MNIST train digits
    mnist_root: str | None = None  # a folder, "bundled", or None ($MCVD_MNIST_DIR, else download)
    image_size: int = 64
    num_digits: int = 2
    motion: str = "deterministic"  # or "stochastic" (velocity redrawn at each bounce)
    # diffusion
    beta_schedule: str = "cosine"  # or "linear" (MCVD's 1e-4..0.02)
    # v-prediction by default: with trailing timesteps sampling starts at t=T-1, where a cosine
    # schedule leaves SNR ~1e-9; an epsilon model's x0 estimate there is its error times ~1e4.
    prediction_type: str = "v_prediction"  # or "epsilon" (MCVD), "sample"
    num_train_timesteps: int = 1000
    noise_shift: float = 1.0  # > 1 divides every step's SNR by noise_shift^2 ("simple diffusion" shift)
    min_snr_gamma: float | None = None  # Min-SNR loss weighting (Hang et al. 2023; 5.0 is usual); None: off
    # optimization
    batch_size: int = 64  # per process and per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 10000  # optimizer steps
    learning_rate: float = 2e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the ceiling; EMA warms up towards it (diffusers EMAModel, power 2/3)
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (Accelerate; fp16 with loss scaling, CUDA only)
    # learning-rate schedule: "warmup_plateau" (linear warm-up, then ReduceLROnPlateau on the
    # validation loss) or a diffusers schedule: constant, constant_with_warmup, linear, cosine, ...
    lr_scheduler: str = "warmup_plateau"
    warmup_steps: int = 500
    plateau_factor: float = 0.5  # LR multiplier at each plateau
    plateau_patience: int = 3  # validations without improvement tolerated before a cut
    plateau_threshold: float = 0.01  # relative improvement that counts
    min_lr: float = 1e-6  # the plateau cuts stop here
    # validation: clips from MNIST validation digits, fixed noise and timesteps, EMA weights
    validate_every: int = 500  # optimizer steps; 0: never (then the last weights are exported)
    val_clips: int = 256
    val_batch_size: int = 64
    # prediction GIFs on fixed validation clips
    sample_every: int = 1000  # 0: never
    sample_clips: int = 4
    sample_sampler: str = EXPORT_SAMPLER  # NAME:STEPS, a sampler of mcvd_diffusers.SAMPLERS
    # the sampler exported pipelines ship with: their scheduler, and STEPS as their default step count
    export_sampler: str = EXPORT_SAMPLER
    # fast paths (mcvd_diffusers/runtime.py), off by default
    channels_last: bool = False  # NHWC convolutions
    compile: bool = False  # torch.compile the UNet; falls back to eager with a warning where unsupported
    fused_adamw: bool = False  # one fused AdamW kernel instead of a loop over parameters
    seed: int = 0  # weights, and (with the process index) each process's data and noise
    # checkpoints
    checkpoint_every: int = 1000  # optimizer steps, and always at the end; 0: only at the end
    checkpoints_total_limit: int | None = 3  # keep the newest N; None: keep all
    resume_from_checkpoint: str | None = None  # "latest" (or a fresh start when there is none) or a folder
    # output and logging
    output_dir: str = "runs/mcvd"
    overwrite: bool = False  # replace an output_dir that holds another run
    log_every: int = 50
    report_to: str = "tensorboard"  # or "none"
    # Hugging Face Hub: upload the exported pipeline and its card at the end
    push_to_hub: bool = False
    hub_model_id: str | None = None  # "user/name"
    hub_private: bool = False

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(fields)}")
        config = cls(**{k: _coerce(v, k) for k, v in values.items()})
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        levels = len(PRESETS[self.preset]["block_out_channels"]) if self.preset in PRESETS else 1
        patch = self.patch_size or (PRESETS[self.preset].get("patch_size", 1) if self.preset in PRESETS else 1)
        patch = patch if patch >= 1 else 1
        checks = [
            (self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}"),
            (self.num_past_frames >= 0 and self.num_current_frames >= 1 and self.num_future_frames >= 0,
             "frame counts must be num_past_frames >= 0, num_current_frames >= 1, num_future_frames >= 0"),
            (0 <= self.prob_mask_past <= 1 and 0 <= self.prob_mask_future <= 1, "mask probabilities must be in [0, 1]"),
            (self.prob_mask_past == 0 or self.num_past_frames > 0, "prob_mask_past > 0 needs num_past_frames > 0"),
            (self.prob_mask_future == 0 or self.num_future_frames > 0,
             "prob_mask_future > 0 needs num_future_frames > 0"),
            (self.patch_size is None or self.patch_size >= 1, "patch_size must be >= 1 (or null: the preset's)"),
            (self.block_out_channels is None or (len(self.block_out_channels) == levels
                                                 and all(c >= 1 for c in self.block_out_channels)),
             f"block_out_channels must list {levels} positive widths, one per level of the {self.preset} preset "
             "(or null: the preset's)"),
            (self.image_size >= 28 and self.image_size % (patch * 2 ** (levels - 1)) == 0,
             f"image_size must be >= 28 and a multiple of {patch * 2 ** (levels - 1)} (patch_size {patch} x "
             f"2^{levels - 1}: the {self.preset} preset runs on a grid of image_size/{patch} and halves it "
             f"{levels - 1} times)"),
            (self.num_digits >= 1, "num_digits must be >= 1"),
            (self.motion in MOTIONS, f"motion must be one of {MOTIONS}"),
            (self.beta_schedule in BETA_SCHEDULES, f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}"),
            (self.prediction_type in PREDICTION_TYPES, f"prediction_type must be one of {PREDICTION_TYPES}"),
            (self.num_train_timesteps >= 2, "num_train_timesteps must be >= 2"),
            (math.isfinite(self.noise_shift) and self.noise_shift > 0, "noise_shift must be a finite number > 0"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma must be > 0 (or null: off)"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
            (0 < self.ema_decay < 1, "ema_decay must be in (0, 1)"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be 'no', 'bf16' or 'fp16'"),
            (self.lr_scheduler in LR_SCHEDULES, f"lr_scheduler must be one of {LR_SCHEDULES}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 < self.plateau_factor < 1, "plateau_factor must be in (0, 1)"),
            (self.plateau_patience >= 0, "plateau_patience must be >= 0"),
            (self.plateau_threshold >= 0, "plateau_threshold must be >= 0"),
            (0 <= self.min_lr <= self.learning_rate, "min_lr must be in [0, learning_rate]"),
            (self.validate_every >= 0, "validate_every must be >= 0"),
            (self.lr_scheduler != "warmup_plateau" or self.validate_every > 0,
             "lr_scheduler warmup_plateau needs validate_every > 0 (it acts on the validation loss)"),
            (self.val_clips >= 1 and self.val_batch_size >= 1, "val_clips and val_batch_size must be >= 1"),
            (self.sample_every >= 0, "sample_every must be >= 0"),
            (1 <= self.sample_clips <= self.val_clips, "sample_clips must be in [1, val_clips]"),
            (_is_sampler(self.sample_sampler), "sample_sampler must be NAME:STEPS with NAME one of "
                                               "ddpm, ddim, dpm++, unipc and STEPS >= 1"),
            (_is_sampler(self.export_sampler), "export_sampler must be NAME:STEPS with NAME one of "
                                               "ddpm, ddim, dpm++, unipc and STEPS >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             "checkpoints_total_limit must be >= 1 (or null: keep all)"),
            (self.resume_from_checkpoint != "", "resume_from_checkpoint must be 'latest', a folder, or null"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.report_to in ("tensorboard", "none"), "report_to must be 'tensorboard' or 'none'"),
            (not self.push_to_hub or bool(self.hub_model_id), "push_to_hub needs hub_model_id ('user/name')"),
        ]
        errors = [message for ok, message in checks if not ok]
        # inf and NaN pass every comparison above that they should fail (inf > 0; NaN compares false both ways)
        errors += [f"{f.name} must be a finite number, got {getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        errors += _output_dir_errors(self.output_dir)
        if self.hub_model_id is not None:
            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError as e:
                errors.append(f"hub_model_id {self.hub_model_id!r} is not a valid Hub repo id: {e}")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))


def _output_dir_errors(output_dir: str) -> list[str]:
    """An output_dir that is, or lies inside, an existing file can never hold a run."""
    path = Path(output_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                return [f"output_dir {output_dir} cannot be created: {candidate} is a file, not a folder"]
            break
    return []


def _is_sampler(spec: str) -> bool:
    try:
        parse_sampler(spec)
    except ValueError:
        return False
    return True


# Keys a resumed run may change: they do not alter the model, the data or the optimization.
RESUMABLE_CHANGES = {"max_steps", "mnist_root", "validate_every", "val_batch_size", "sample_every", "sample_clips",
                     "sample_sampler", "export_sampler", "channels_last", "compile", "fused_adamw", "checkpoint_every",
                     "checkpoints_total_limit", "resume_from_checkpoint", "output_dir", "overwrite", "log_every",
                     "report_to", "push_to_hub", "hub_model_id", "hub_private"}


def _coerce(value, key: str):
    """Checks a config value against the field's type; strings (command line) are read as YAML scalars."""
    import yaml

    hint = typing.get_type_hints(TrainConfig)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, str) and str not in allowed:
        value = yaml.safe_load(value)
        if isinstance(value, str) and float in allowed:  # YAML reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
    if type(None) in allowed and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    for t in allowed:
        if typing.get_origin(t) is list:
            (item,) = typing.get_args(t)
            if isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return list(value)
            continue
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise ValueError(f"config key {key!r} expects {hint}, got {value!r}")


def build_unet(config: TrainConfig) -> MCVDUNet2DModel:
    overrides = {key: getattr(config, key) for key in ("patch_size", "block_out_channels")
                 if getattr(config, key) is not None}
    return MCVDUNet2DModel.from_preset(
        config.preset,
        **overrides,
        sample_size=config.image_size,
        num_past_frames=config.num_past_frames,
        num_current_frames=config.num_current_frames,
        num_future_frames=config.num_future_frames,
        prob_mask_past=config.prob_mask_past,
        prob_mask_future=config.prob_mask_future,
    )


def prediction_target(scheduler: DDPMScheduler, current: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(current, noise, t)
    return current


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) expressed for the scheduler's prediction target."""
    alphas_cumprod = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "epsilon":
        return clipped / snr
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def _unwrapped(unet) -> MCVDUNet2DModel:
    # The frame layout lives on the model; a DistributedDataParallel wrapper only runs its forward.
    return unet.module if isinstance(unet, torch.nn.parallel.DistributedDataParallel) else unet


def denoising_loss(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, clip: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor, keep_past=None, keep_future=None) -> torch.Tensor:
    """Per-sample MSE (B,) of the model's prediction for clips (B, clip_length, C, H, W) in [0, 1],
    given the noise of the current frames, the timesteps and the conditioning masks."""
    past, current, future = _unwrapped(unet).split_clip(clip * 2 - 1)
    noisy = scheduler.add_noise(current, noise, t)
    prediction = unet(noisy, t, past_frames=past, future_frames=future, keep_past=keep_past,
                      keep_future=keep_future).sample
    target = prediction_target(scheduler, current, noise, t)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def diffusion_loss(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, clip: torch.Tensor,
                   generator: torch.Generator | None = None, min_snr_gamma: float | None = None) -> torch.Tensor:
    """MCVD's training loss on a batch of clips (B, clip_length, C, H, W) in [0, 1].

    Timesteps are uniform over the training schedule; each sample's past and future
    blocks are masked with the model's ``prob_mask_past`` / ``prob_mask_future``."""
    model = _unwrapped(unet)
    cfg = model.config
    batch, device = clip.shape[0], clip.device
    noise = torch.randn((batch, cfg.num_current_frames, *model.frame_shape), generator=generator, device=device,
                        dtype=clip.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
    keep_past = draw_keep_mask(batch, cfg.prob_mask_past, generator, device)
    keep_future = draw_keep_mask(batch, cfg.prob_mask_future, generator, device) if cfg.num_future_frames else None
    losses = denoising_loss(unet, scheduler, clip, noise, t, keep_past, keep_future)
    if min_snr_gamma is not None:
        losses = losses * min_snr_weights(scheduler, t, min_snr_gamma)
    return losses.mean()


class ValidationSet:
    """Fixed clips from MNIST validation digits, each with fixed noise and a fixed timestep.

    The timesteps are spread evenly over the schedule and everything is drawn once from a
    seeded CPU generator, so the loss is comparable across evaluations, devices and process
    counts. Conditioning is never masked: it measures prediction."""

    def __init__(self, digits: MNISTDigits, unet: MCVDUNet2DModel, config: TrainConfig, seed: int = VALIDATION_SEED):
        generator = torch.Generator().manual_seed(seed)
        frames = MovingMNIST(digits.images, image_size=config.image_size, num_digits=config.num_digits,
                             num_frames=unet.clip_length, motion=config.motion)
        n, steps = config.val_clips, config.num_train_timesteps
        self.clips = frames.sample(n, generator)
        self.noise = torch.randn((n, unet.config.num_current_frames, *unet.frame_shape), generator=generator)
        self.timesteps = ((torch.arange(n) + 0.5) * steps / n).long().clamp(max=steps - 1)

    def __len__(self) -> int:
        return len(self.clips)

    @torch.no_grad()
    def loss(self, unet: MCVDUNet2DModel, scheduler: DDPMScheduler, accelerator: Accelerator, batch_size: int) -> float:
        """The mean loss over all clips; each process scores its share and the sums are reduced."""
        device, was_training = accelerator.device, unet.training
        unet.eval()
        total = torch.zeros((), device=device)
        for index in torch.arange(accelerator.process_index, len(self), accelerator.num_processes).split(batch_size):
            with accelerator.autocast():
                losses = denoising_loss(unet, scheduler, self.clips[index].to(device), self.noise[index].to(device),
                                        self.timesteps[index].to(device))
            total += losses.sum()
        unet.train(was_training)
        return accelerator.reduce(total, "sum").item() / len(self)


def write_sample_gif(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, validation: ValidationSet, config: TrainConfig,
                     path: Path) -> Path:
    """Predicts the first ``sample_clips`` validation clips and writes past | ground truth | prediction."""
    from .evaluation import comparison_gif  # plotting helpers; imported only when a GIF is due

    name, steps = parse_sampler(config.sample_sampler)
    pipe = MCVDPipeline(unet=unet, scheduler=make_sampler(name, scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    clips = validation.clips[: config.sample_clips].to(device)
    past, current, future = unet.split_clip(clips)
    video = pipe(past if past.shape[1] else None, future_frames=future, batch_size=len(clips),
                 num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0)).frames
    return comparison_gif(path, past.cpu(), current.cpu(), {"prediction": video.cpu()})


def save_pipeline(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, destination: Path, info: dict,
                  sampler_spec: str = EXPORT_SAMPLER) -> Path:
    """Saves a pipeline (safetensors) that samples well out of the box, with its model card; atomically.
    It ships with the sampler ``sampler_spec`` (NAME:STEPS): its scheduler, and STEPS as the default."""
    destination = Path(destination)
    tmp = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    name, steps = parse_sampler(sampler_spec)
    sampler = make_sampler(name, scheduler.config)
    with explain_disk_full(tmp):
        MCVDPipeline(unet=unet, scheduler=sampler, default_num_inference_steps=steps).save_pretrained(
            tmp, max_shard_size=MAX_SHARD_SIZE)
        add_remote_code(tmp)  # DiffusionPipeline.from_pretrained(..., trust_remote_code=True) without this package
        write_checksums(tmp)  # from_pretrained verifies them
        info = {**info, "scheduler": f"{type(sampler).__name__} ({name})", "num_inference_steps": steps}
        write_model_card(tmp, info, info["config"].get("hub_model_id") or str(destination))
        replace_dir(tmp, destination)
    return destination


def _check_launch(accelerator: Accelerator) -> None:
    """`accelerate launch --cpu --num_processes N` starts a single process (Accelerate's simple launcher
    ignores N without MPI). Say so instead of training on one process the user did not ask for."""
    if accelerator.num_processes > 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
        return
    import psutil

    try:
        args = psutil.Process().parent().cmdline()
    except (psutil.Error, AttributeError):
        return
    wanted = 1
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else (
            args[i + 1] if arg == "--num_processes" and i + 1 < len(args) else None)
        if value is not None and value.isdigit():
            wanted = int(value)
    if wanted > 1:
        raise ValueError(f"accelerate launch --cpu started 1 process, not the {wanted} asked for: Accelerate runs "
                         f"several CPU processes with torchrun and gloo only as "
                         f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {wanted} ...`")


RUN_MARKER = ".mcvd-run"  # written into every output_dir this project's training creates


def _describe(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_output_dir(config: TrainConfig, out: Path, resuming: bool) -> str | None:
    """Returns why ``out`` must be emptied first, or None. Only a folder this project's training created
    (it holds RUN_MARKER) is ever emptied; anything else in the way is refused, naming what is there."""
    if resuming or not (out.exists() and any(out.iterdir())):
        return None
    if not (out / RUN_MARKER).is_file():
        raise ValueError(f"output_dir {out} is not empty and was not created by mcvd-diffusers training (no "
                         f"{RUN_MARKER} marker); it holds: {_describe(out)}. It is never deleted: choose another "
                         "output_dir, or empty it yourself")
    if config.overwrite:
        return f"overwrite=true: replacing the run in {out}"
    if config.resume_from_checkpoint == "latest":
        if (out / "pipeline").is_dir():
            raise ValueError(f"output_dir {out} holds a finished run's pipeline/ but no checkpoint to resume; pass "
                             "overwrite=true to replace that run, or choose another output_dir")
        # killed before its first checkpoint (only logs, GIFs, best/ or a .partial): nothing to resume
        return f"{out} holds no complete checkpoint to resume ({_describe(out)}): starting a fresh run there"
    raise ValueError(f"output_dir {out} already holds another run ({_describe(out)}); pass "
                     "resume_from_checkpoint=latest to continue it, or overwrite=true to replace it")


def check_resume_compatible(saved: dict, config: TrainConfig, checkpoint: Path) -> None:
    current = config.to_dict()
    unknown = sorted(set(saved) - set(current))
    differ = sorted(k for k in current if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current[k])
    if unknown or differ:
        details = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in differ)
        raise ValueError(f"cannot resume {checkpoint} with this config: " + (details or f"unknown keys {unknown}")
                         + ". These keys define the model, the data or the optimization; resume with the "
                         f"checkpoint's values, or start a new run in another output_dir. Keys that may change: "
                         f"{sorted(RESUMABLE_CHANGES)}")


def training_info(config: TrainConfig, data_source: str, step: int, num_processes: int, history: dict,
                  weights_step: int, val_loss: float | None) -> dict:
    """What an exported pipeline records of its training (training_info.json, the model card)."""
    samples_seen = step * config.batch_size * config.gradient_accumulation_steps * num_processes
    return {"config": config.to_dict(), "data_source": data_source, "steps": step, "num_processes": num_processes,
            "samples_seen": samples_seen, "final_loss": history["train_loss"], "weights_step": weights_step,
            "val_loss": val_loss, "train_seconds": history.get("train_seconds"), "commands": history.get("commands", [])}


def _rank_seed(seed: int, process_index: int) -> int:
    return (seed << 16) + process_index  # one data-and-noise stream per process


def _hparams(config: TrainConfig) -> dict:
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.to_dict().items()}


def train(config: TrainConfig, command: str | None = None) -> Path:
    """Trains (or resumes) a run and returns the folder of the exported pipeline (EMA weights).
    ``command``: the command line that started it, recorded in the model card (train_mcvd.py passes it)."""
    config.validate()
    # Refuse a precision the device cannot run before Accelerate fixes its process-wide state.
    # (cpu= as Accelerator reads it: a PartialState made without it would pin a CPU run to one process.)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_precision({"no": "fp32"}.get(config.mixed_precision, config.mixed_precision), state.device)
    out = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              log_with="tensorboard" if config.report_to == "tensorboard" else None,
                              project_dir=str(out))
    _check_launch(accelerator)
    device, is_main = accelerator.device, accelerator.is_main_process
    checkpoints_dir = out / "checkpoints"
    resume = resolve_checkpoint(config.resume_from_checkpoint, checkpoints_dir) if config.resume_from_checkpoint else None
    if resume is not None:
        check_resume_compatible(read_trainer_state(resume)["config"], config, resume)
    clear = _check_output_dir(config, out, resuming=resume is not None)  # every process, before any change
    accelerator.wait_for_everyone()
    if is_main:
        if clear:
            accelerator.print(clear)
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("an output_dir of mcvd-diffusers training: overwrite=true may delete it\n")
        remove_incomplete(checkpoints_dir)  # saves and prunes that were interrupted
    accelerator.wait_for_everyone()

    set_seed(config.seed)
    unet = build_unet(config)
    parameter_names = [name for name, _ in unet.named_parameters()]
    scheduler = make_noise_scheduler(config.beta_schedule, config.prediction_type, config.num_train_timesteps,
                                     config.noise_shift)
    train_digits = load_mnist("train", root=config.mnist_root)
    train_fingerprint = digits_fingerprint(train_digits.images)  # a resumed run must draw the same digits
    saved = read_trainer_state(resume) if resume is not None else None
    if saved is not None and saved["train_digits"] != train_fingerprint:
        raise ValueError(f"cannot resume {resume}: the training digits ({train_digits.source}) are not the ones the "
                         f"checkpoint was trained on ({saved['data_source']}); mnist_root may move, not change "
                         "what it holds")
    data = MovingMNIST(train_digits.images.to(device), image_size=config.image_size, num_digits=config.num_digits,
                       num_frames=unet.clip_length, motion=config.motion)
    validation = ValidationSet(load_mnist("val", root=config.mnist_root), unet, config)
    accelerator.print(f"data: {train_digits.source}; validation: {len(validation)} clips of MNIST validation digits")
    accelerator.print(f"model: preset {config.preset}, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
                      f"parameters; {accelerator.num_processes} process(es) on {device}")

    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3,
                   model_cls=MCVDUNet2DModel, model_config=unet.config)
    if config.channels_last:
        to_channels_last(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                  fused=config.fused_adamw or None)
    # Not passed to accelerator.prepare, which would step it once per process: it counts optimizer steps.
    lr_schedule = make_lr_schedule(config.lr_scheduler, optimizer, warmup_steps=config.warmup_steps,
                                   total_steps=config.max_steps, factor=config.plateau_factor,
                                   patience=config.plateau_patience, threshold=config.plateau_threshold,
                                   min_lr=config.min_lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    model = accelerator.unwrap_model(unet)
    ema.to(device)
    generator = torch.Generator(device).manual_seed(_rank_seed(config.seed, accelerator.process_index))
    history = {"validations": [], "best": None, "train_loss": None}
    step = 0
    if resume is not None:
        state = load_checkpoint(accelerator, resume, model, ema, parameter_names, generator)
        lr_schedule.load_state_dict(state["lr_schedule"])
        step, history = state["step"], state["history"]
        accelerator.print(f"resumed from {resume} at step {step}")
    if config.report_to == "tensorboard":
        accelerator.init_trackers("logs", config=_hparams(config))
    if config.compile:
        # Compile now, on a throw-away batch of the training shape (its own RNG), so that an
        # unsupported setup falls back to eager before training starts.
        probe = torch.Generator(device).manual_seed(-1 & 0xFFFF)

        def probe_step():
            with accelerator.autocast():
                loss = diffusion_loss(unet, scheduler, data.sample(config.batch_size, probe), probe)
            accelerator.backward(loss)
            optimizer.zero_grad(set_to_none=True)

        maybe_compile(model, probe_step)

    def with_ema_weights(fn):
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        try:
            return fn()
        finally:
            ema.restore(model.parameters())

    def info(weights_step: int, val_loss: float | None) -> dict:
        history["train_seconds"] = seconds_before + time.perf_counter() - started
        return training_info(config, train_digits.source, step, accelerator.num_processes, history, weights_step,
                             val_loss)

    samples_per_step = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    progress = tqdm(total=config.max_steps, initial=step, desc="train", disable=not is_main)
    running, micro_batches, grad_norm = torch.zeros((), device=device), 0, None
    logged_step, logged_time = step, time.perf_counter()
    # wall time and commands over every start of the run (resumes add theirs), for the model card
    seconds_before = history.get("train_seconds") or 0.0
    history["commands"] = history.get("commands", []) + ([command] if command else [])
    started = time.perf_counter()

    def save() -> Path:
        history["train_seconds"] = seconds_before + time.perf_counter() - started
        trainer_state = {"config": config.to_dict(), "data_source": train_digits.source,
                         "train_digits": train_fingerprint, "lr_schedule": lr_schedule.state_dict(),
                         "history": history}
        return save_checkpoint(accelerator, checkpoints_dir, step, ema, parameter_names, generator, trainer_state,
                               config.checkpoints_total_limit)

    # SIGTERM / Ctrl-C: finish the step, save a checkpoint, stop (interrupt.py)
    with StopOnSignal() as stop:
        while step < config.max_steps:
            unet.train()
            for _ in range(config.gradient_accumulation_steps):
                with accelerator.accumulate(unet):
                    clip = data.sample(config.batch_size, generator)
                    with accelerator.autocast():
                        loss = diffusion_loss(unet, scheduler, clip, generator, config.min_snr_gamma)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), config.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                micro_batches += 1
            lr_schedule.step()
            ema.step(model.parameters())
            step += 1
            progress.update()
            last = step == config.max_steps
            validate = config.validate_every > 0 and (step % config.validate_every == 0 or last)
            checkpoint = (config.checkpoint_every > 0 and step % config.checkpoint_every == 0) or last
            sample = config.sample_every > 0 and (step % config.sample_every == 0 or last)

            if step % config.log_every == 0 or validate or checkpoint:
                # Checked before anything is validated or saved: NaN weights never reach a checkpoint.
                mean_loss = accelerator.reduce(running, "mean").item() / micro_batches
                if not math.isfinite(mean_loss):
                    kept = list_checkpoints(checkpoints_dir)
                    raise FloatingPointError(
                        f"the training loss became {mean_loss} between steps {logged_step} and {step}; stopped. "
                        f"Last good checkpoint: {kept[-1] if kept else 'none'} (resume it with a lower "
                        f"learning_rate, grad_clip, or bf16 instead of fp16)")
                now = time.perf_counter()
                history["train_loss"] = mean_loss
                logs = {"train/loss": mean_loss, "train/lr": lr_schedule.get_last_lr()[0],
                        "train/grad_norm": float(grad_norm), "train/samples_per_second":
                        (step - logged_step) * samples_per_step / (now - logged_time)}
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['train/lr']:.2e}")
                running, micro_batches, logged_step, logged_time = torch.zeros((), device=device), 0, step, now

            if validate:
                val_loss = with_ema_weights(
                    lambda: validation.loss(model, scheduler, accelerator, config.val_batch_size))
                cut = lr_schedule.report(val_loss)
                history["validations"].append({"step": step, "loss": val_loss})
                accelerator.log({"val/loss": val_loss}, step=step)
                if is_main:
                    tqdm.write(f"step {step}: validation loss {val_loss:.5f}"
                               + (", learning rate cut" if cut else ""))
                if history["best"] is None or val_loss < history["best"]["loss"]:
                    history["best"] = {"step": step, "loss": val_loss}
                    if is_main:
                        with_ema_weights(lambda: save_pipeline(model, scheduler, out / "best", info(step, val_loss),
                                                               config.export_sampler))
            if sample and is_main:
                gif = out / "samples" / f"step-{step:07d}.gif"
                with_ema_weights(lambda: write_sample_gif(model, scheduler, validation, config, gif))
            signum = stop.requested(accelerator)
            if checkpoint or signum:
                saved = save()
            if signum:
                progress.close()
                accelerator.end_training()  # flushes the logs
                raise TrainingInterrupted(signum, step, saved)
    progress.close()

    pipeline_dir = out / "pipeline"
    if is_main:
        best = history["best"]
        if best is not None and (out / "best").is_dir():
            # the best validation loss chose the weights; the card records the whole run
            tmp = out / ".pipeline.copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(out / "best", tmp)
            write_model_card(tmp, {**json.loads((tmp / "training_info.json").read_text()),
                                   **info(best["step"], best["loss"])}, config.hub_model_id or str(pipeline_dir))
            replace_dir(tmp, pipeline_dir)
        else:
            with_ema_weights(lambda: save_pipeline(model, scheduler, pipeline_dir, info(step, None),
                                                   config.export_sampler))
        summary = {**info(best["step"] if best else step, best["loss"] if best else None),
                   "validations": history["validations"], "seconds": time.perf_counter() - started,
                   "device": str(device), "data_seeds": [_rank_seed(config.seed, r)
                                                          for r in range(accelerator.num_processes)]}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved the pipeline (EMA weights of step {summary['weights_step']}) to {pipeline_dir}")
        if config.push_to_hub:
            accelerator.print(f"uploaded to {push_to_hub(pipeline_dir, config.hub_model_id, config.hub_private)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return pipeline_dir


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
    scheduler = make_noise_scheduler(config.beta_schedule, config.prediction_type, config.num_train_timesteps,
                                     config.noise_shift)
    history, step = state["history"], state["step"]
    val = next((v["loss"] for v in history["validations"] if v["step"] == step), None)
    info = training_info(config, state["data_source"], step, state["num_processes"], history, step, val)
    return save_pipeline(unet, scheduler, Path(destination), info, config.export_sampler)


def load_config_file(path: str | os.PathLike) -> dict:
    """Reads a YAML or JSON config file into a dict (validated by TrainConfig.from_dict)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    with open(path) as f:
        values = yaml.safe_load(f) if path.suffix in (".yaml", ".yml") else json.load(f)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config must be a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_overrides(args: list[str]) -> dict:
    """["--key", "value", "--key=value", "--flag"] -> {"key": "value", ..., "flag": "true"} (strings;
    TrainConfig coerces them). A key followed by another --key, or by nothing, is a flag set to true."""
    values, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                key, value = arg[2:], "true"
                i += 1
            else:
                key, value = arg[2:], args[i + 1]
                i += 2
        values[key.replace("-", "_")] = value
    return values
