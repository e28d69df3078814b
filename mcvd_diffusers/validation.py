"""The fixed validation clips: their loss (which chooses the exported weights and drives the LR plateau
rule) and their predictions as a GIF."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from .config import TrainConfig
from .data.mnist import MNISTDigits
from .data.moving_mnist import MovingMNIST
from .losses import denoising_loss
from .models.unet_mcvd import MCVDUNet2DModel
from .pipeline_mcvd import MCVDPipeline

VALIDATION_SEED = 1234


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
    from .report import comparison_gif  # plotting helpers; imported only when a GIF is due

    sampler = config.sample_sampler
    pipe = MCVDPipeline(unet=unet, scheduler=sampler.build(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    clips = validation.clips[: config.sample_clips].to(device)
    past, current, future = unet.split_clip(clips)
    video = pipe(past if past.shape[1] else None, future_frames=future, batch_size=len(clips),
                 num_inference_steps=sampler.steps, generator=torch.Generator(device).manual_seed(0)).frames
    return comparison_gif(path, past.cpu(), current.cpu(), {"prediction": video.cpu()})
