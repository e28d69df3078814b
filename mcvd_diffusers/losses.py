"""MCVD's training loss: prediction targets, Min-SNR weights, conditioning masks and the diffusion loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from diffusers.video_processor import VideoProcessor

from .unet.unet_mcvd import MCVDUNet2DModel


def draw_keep_mask(batch_size: int, prob_mask: float, generator: torch.Generator | None = None, device=None
                   ) -> torch.Tensor | None:
    """A (B,) bool tensor, False for the samples whose block is replaced by zeros; None when p == 0."""
    if prob_mask == 0:
        return None
    return torch.rand(batch_size, generator=generator, device=device) >= prob_mask


def draw_past_keep(batch_size: int, cfg, generator: torch.Generator | None = None, device=None
                   ) -> torch.Tensor | None:
    """The past's keep mask: MCVD's per-sample (B,) mask, or for a ``partial_past_mask`` model a per-frame
    (B, P) one, where half of the masked samples lose every past frame and the others keep their last k,
    k uniform in 1..P-1 (what an unconditional rollout conditions on after its first blocks)."""
    keep = draw_keep_mask(batch_size, cfg.prob_mask_past, generator, device)
    frames = cfg.num_past_frames
    if keep is None or not getattr(cfg, "partial_past_mask", False) or frames < 2:
        return keep
    fully = torch.rand(batch_size, generator=generator, device=device) < 0.5
    some = torch.randint(1, frames, (batch_size,), generator=generator, device=device)
    kept = torch.where(keep, frames, torch.where(fully, 0, some))
    return torch.arange(frames, device=device)[None] >= (frames - kept)[:, None]


def prediction_target(scheduler: DDPMScheduler, current: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(current, noise, t)
    return current


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) expressed for the scheduler's prediction target."""
    snr = compute_snr(scheduler, t)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "epsilon":
        return clipped / snr
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def denoising_loss(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, clip: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor, keep_past=None, keep_future=None) -> torch.Tensor:
    """Per-sample MSE (B,) of the model's prediction for clips (B, clip_length, C, H, W) in [0, 1],
    given the noise of the current frames, the timesteps and the conditioning masks."""
    # the frame layout lives on the model; a DistributedDataParallel wrapper only runs its forward
    past, current, future = extract_model_from_parallel(unet).split_clip(VideoProcessor.normalize(clip))
    noisy = scheduler.add_noise(current, noise, t)
    prediction = unet(noisy, t, past_frames=past, future_frames=future, keep_past=keep_past,
                      keep_future=keep_future).sample
    target = prediction_target(scheduler, current, noise, t)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def augment_past(clip: torch.Tensor, num_past_frames: int, max_std: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Clips (B, T, C, H, W) in [0, 1] whose first ``num_past_frames`` carry Gaussian noise of a per-clip
    std drawn from U(0, max_std), measured on data in [-1, 1] (context noise augmentation)."""
    batch = clip.shape[0]
    std = torch.rand(batch, generator=generator, device=clip.device, dtype=clip.dtype) * max_std
    noise = torch.randn((batch, num_past_frames, *clip.shape[2:]), generator=generator, device=clip.device,
                        dtype=clip.dtype)
    past = clip[:, :num_past_frames] + noise * (std / 2)[:, None, None, None, None]  # [0, 1] data: half the std
    return torch.cat([past, clip[:, num_past_frames:]], dim=1)


def diffusion_loss(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, clip: torch.Tensor,
                   generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                   past_noise_augment: float = 0.0, timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """MCVD's training loss on clips (B, clip_length, C, H, W) in [0, 1]. Timesteps are uniform over the schedule,
    or over ``timesteps`` (a sampler's grid) when given; past and future blocks are masked per sample with the
    model's ``prob_mask_past`` / ``prob_mask_future``; ``past_noise_augment`` > 0 noises the past first."""
    model = extract_model_from_parallel(unet)
    cfg = model.config
    batch, device = clip.shape[0], clip.device
    noise = torch.randn((batch, cfg.num_current_frames, *model.frame_shape), generator=generator, device=device,
                        dtype=clip.dtype)
    if timesteps is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
    else:
        t = timesteps.to(device)[torch.randint(0, len(timesteps), (batch,), generator=generator, device=device)]
    keep_past = draw_past_keep(batch, cfg, generator, device)
    keep_future = draw_keep_mask(batch, cfg.prob_mask_future, generator, device) if cfg.num_future_frames else None
    if past_noise_augment > 0 and cfg.num_past_frames > 0:
        clip = augment_past(clip, cfg.num_past_frames, past_noise_augment, generator)
    losses = denoising_loss(unet, scheduler, clip, noise, t, keep_past, keep_future)
    if min_snr_gamma is not None:
        losses = losses * min_snr_weights(scheduler, t, min_snr_gamma)
    return losses.mean()
