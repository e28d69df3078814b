"""Training: the config, the diffusion loss and the loop used by train_mcvd.py.

The loop draws fresh Moving MNIST clips from MNIST train digits every step, on the
training device, applies MCVD's masking, and exports an ``MCVDPipeline`` with the EMA
weights at the end.
"""

from __future__ import annotations

import dataclasses
import json
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
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .data.mnist import load_mnist
from .data.moving_mnist import MOTIONS, MovingMNIST
from .masking import draw_keep_mask
from .models.unet_mcvd import PRESETS, MCVDUNet2DModel
from .pipeline_mcvd import MCVDPipeline
from .runtime import check_precision, maybe_compile, to_channels_last
from .schedulers import BETA_SCHEDULES, PREDICTION_TYPES, make_noise_scheduler


@dataclass
class TrainConfig:
    """Every training option. Configs are plain YAML/JSON dicts of these keys."""

    # model: a preset from models/unet_mcvd.py and MCVD's frame layout
    preset: str = "tiny"
    num_past_frames: int = 5
    num_current_frames: int = 10
    num_future_frames: int = 0
    prob_mask_past: float = 0.0  # MCVD masking: > 0 also teaches unconditional generation
    prob_mask_future: float = 0.0  # > 0 lets an interpolation model also predict
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
    # optimization
    batch_size: int = 64
    max_steps: int = 10000
    learning_rate: float = 2e-4
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the ceiling; EMA warms up towards it (diffusers EMAModel, power 2/3)
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (Accelerate; fp16 with loss scaling, CUDA only)
    # fast paths (mcvd_diffusers/runtime.py), off by default
    channels_last: bool = False  # NHWC convolutions
    compile: bool = False  # torch.compile the UNet; falls back to eager with a warning where unsupported
    fused_adamw: bool = False  # one fused AdamW kernel instead of a loop over parameters
    seed: int = 0
    # output
    output_dir: str = "runs/mcvd"
    log_every: int = 50
    overwrite: bool = False  # replace an existing output_dir

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
        checks = [
            (self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}"),
            (self.num_past_frames >= 0 and self.num_current_frames >= 1 and self.num_future_frames >= 0,
             "frame counts must be num_past_frames >= 0, num_current_frames >= 1, num_future_frames >= 0"),
            (0 <= self.prob_mask_past <= 1 and 0 <= self.prob_mask_future <= 1, "mask probabilities must be in [0, 1]"),
            (self.image_size >= 28 and self.image_size % 8 == 0, "image_size must be a multiple of 8, >= 28"),
            (self.num_digits >= 1, "num_digits must be >= 1"),
            (self.motion in MOTIONS, f"motion must be one of {MOTIONS}"),
            (self.beta_schedule in BETA_SCHEDULES, f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}"),
            (self.prediction_type in PREDICTION_TYPES, f"prediction_type must be one of {PREDICTION_TYPES}"),
            (self.num_train_timesteps >= 2, "num_train_timesteps must be >= 2"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
            (0 < self.ema_decay < 1, "ema_decay must be in (0, 1)"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be 'no', 'bf16' or 'fp16'"),
            (self.log_every >= 1, "log_every must be >= 1"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))


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
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise ValueError(f"config key {key!r} expects {hint}, got {value!r}")


def build_unet(config: TrainConfig) -> MCVDUNet2DModel:
    return MCVDUNet2DModel.from_preset(
        config.preset,
        sample_size=config.image_size,
        num_past_frames=config.num_past_frames,
        num_current_frames=config.num_current_frames,
        num_future_frames=config.num_future_frames,
        prob_mask_past=config.prob_mask_past,
        prob_mask_future=config.prob_mask_future,
    )


def diffusion_loss(
    unet: MCVDUNet2DModel,
    scheduler: DDPMScheduler,
    clip: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MCVD's denoising loss on a batch of clips (B, clip_length, C, H, W) in [0, 1].

    Timesteps are uniform over the training schedule; each sample's past and future
    blocks are masked with the model's ``prob_mask_past`` / ``prob_mask_future``."""
    cfg = unet.config
    past, current, future = unet.split_clip(clip * 2 - 1)
    batch, device = clip.shape[0], clip.device
    noise = torch.randn(current.shape, generator=generator, device=device, dtype=current.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
    noisy = scheduler.add_noise(current, noise, t)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(current, noise, t)
    else:
        target = current
    keep_past = draw_keep_mask(batch, cfg.prob_mask_past, generator, device)
    keep_future = draw_keep_mask(batch, cfg.prob_mask_future, generator, device) if future is not None else None
    prediction = unet(noisy, t, past_frames=past, future_frames=future, keep_past=keep_past,
                      keep_future=keep_future).sample
    return F.mse_loss(prediction.float(), target.float())


def _prepare_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise ValueError(f"output_dir {out} already holds files; pass overwrite=true to replace them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(config: TrainConfig) -> Path:
    """Trains a model and returns the folder of the exported pipeline (EMA weights)."""
    config.validate()
    # Refuse a precision the device cannot run before Accelerate fixes its process-wide state.
    check_precision({"no": "fp32"}.get(config.mixed_precision, config.mixed_precision), PartialState().device)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    out = _prepare_output_dir(config) if accelerator.is_main_process else Path(config.output_dir)
    set_seed(config.seed)

    unet = build_unet(config)
    scheduler = make_noise_scheduler(config.beta_schedule, config.prediction_type, config.num_train_timesteps)
    digits = load_mnist("train", root=config.mnist_root)
    data = MovingMNIST(digits.images.to(device), image_size=config.image_size, num_digits=config.num_digits,
                       num_frames=unet.clip_length, motion=config.motion)
    accelerator.print(f"data: {digits.source}")
    accelerator.print(f"model: preset {config.preset}, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")

    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3,
                   model_cls=MCVDUNet2DModel, model_config=unet.config)
    if config.channels_last:
        to_channels_last(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                  fused=config.fused_adamw or None)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema.to(device)
    if config.compile:
        # Compile now, on a throw-away batch of the training shape (its own RNG), so that an
        # unsupported setup falls back to eager before training starts.
        probe = torch.Generator(device).manual_seed(-1 & 0xFFFF)

        def probe_step():
            with accelerator.autocast():
                accelerator.backward(diffusion_loss(unet, scheduler, data.sample(config.batch_size, probe), probe))
            optimizer.zero_grad(set_to_none=True)

        maybe_compile(accelerator.unwrap_model(unet), probe_step)
    # Each process draws its own clips and noise.
    generator = torch.Generator(device).manual_seed(config.seed * 1000 + accelerator.process_index)

    progress = tqdm(range(config.max_steps), desc="train", disable=not accelerator.is_main_process)
    losses, started = [], time.perf_counter()
    for step in progress:
        unet.train()
        clip = data.sample(config.batch_size, generator)
        with accelerator.autocast():
            loss = diffusion_loss(unet, scheduler, clip, generator)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at step {step}: stopping (lower learning_rate or use bf16)")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
            recent = sum(losses[-config.log_every:]) / len(losses[-config.log_every:])
            progress.set_postfix(loss=f"{recent:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")

    accelerator.wait_for_everyone()
    pipeline_dir = out / "pipeline"
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        ema.copy_to(model.parameters())
        MCVDPipeline(unet=model, scheduler=scheduler).save_pretrained(pipeline_dir)
        summary = {
            "config": config.to_dict(),
            "data_source": digits.source,
            "steps": config.max_steps,
            "final_loss": sum(losses[-config.log_every:]) / len(losses[-config.log_every:]),
            "seconds": time.perf_counter() - started,
            "device": str(device),
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved the pipeline (EMA weights) to {pipeline_dir}")
    accelerator.end_training()
    return pipeline_dir


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
    """["--key", "value", "--flag=value"] -> {"key": "value", ...} (strings; TrainConfig coerces them)."""
    values, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        values[key.replace("-", "_")] = value
    return values
