"""The fixed validation clips: their loss (which chooses the exported weights and drives the LR plateau
rule), their predictions rolled out to the task's 10 frames (scored, and shown as a GIF)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from .config import TrainConfig, training_timesteps
from .data.mnist import MNISTDigits
from .data.moving_mnist import MovingMNIST
from .losses import denoising_loss
from .metrics import mse_per_frame, ssim_per_frame
from .unet.unet_mcvd import MCVDUNet2DModel
from .pipeline_mcvd import MCVDPipeline
from .schedulers import SamplerSpec

VALIDATION_SEED = 1234
# The task every model is scored on, whatever its block size (num_current_frames): the 10 frames after the past.
PREDICTED_FRAMES = 10


class ValidationSet:
    """Fixed clips from MNIST validation digits, each with fixed noise and a fixed timestep (spread evenly over the
    schedule, or cycling through the sampler grid the model trains on), all drawn once from a seeded CPU generator,
    so the loss compares across evaluations, devices and process counts. Conditioning is never masked. The clips
    hold the past and ``PREDICTED_FRAMES`` more, so models of every block size are scored on the same 10 frames."""

    def __init__(self, digits: MNISTDigits, unet: MCVDUNet2DModel, config: TrainConfig, seed: int = VALIDATION_SEED):
        generator = torch.Generator().manual_seed(seed)
        self.clip_length, self.num_past = unet.clip_length, unet.config.num_past_frames
        frames = MovingMNIST(digits.images, image_size=config.image_size, num_digits=config.num_digits,
                             num_frames=max(unet.clip_length, self.num_past + PREDICTED_FRAMES), motion=config.motion,
                             bounce=config.bounce, labels=digits.labels)
        n, steps = config.val_clips, config.num_train_timesteps
        # the layout (digit positions and labels) lets the benchmarks score digit identity on these clips
        self.clips, self.positions, self.labels = frames.sample(n, generator, return_layout=True)
        self.noise = torch.randn((n, unet.config.num_current_frames, *unet.frame_shape), generator=generator)
        grid = training_timesteps(config)  # the loss is measured where the model trains
        if grid is None:
            self.timesteps = ((torch.arange(n) + 0.5) * steps / n).long().clamp(max=steps - 1)
        else:
            self.timesteps = grid[torch.arange(n) % len(grid)]

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
                clips = self.clips[index, : self.clip_length].to(device)
                losses = denoising_loss(unet, scheduler, clips, self.noise[index].to(device),
                                        self.timesteps[index].to(device))
            total += losses.sum()
        unet.train(was_training)
        return accelerator.reduce(total, "sum").item() / len(self)

    @torch.no_grad()
    def rollout(self, unet: MCVDUNet2DModel, scheduler: DDPMScheduler, sampler: SamplerSpec, count: int):
        """The first ``count`` clips' past, their next ``PREDICTED_FRAMES`` frames and the model's prediction
        of them (block by block, seeded), all (count, frames, C, H, W) in [0, 1] on the CPU."""
        pipe = MCVDPipeline(unet=unet, scheduler=sampler.build(scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        clips = self.clips[:count]
        past, target = clips[:, : self.num_past], clips[:, self.num_past : self.num_past + PREDICTED_FRAMES]
        video = pipe(past.to(pipe.device), num_frames=PREDICTED_FRAMES, num_inference_steps=sampler.steps,
                     generator=torch.Generator(pipe.device).manual_seed(0)).frames
        return past, target, video.cpu().float()

    def rollout_scores(self, unet: MCVDUNet2DModel, scheduler: DDPMScheduler, sampler: SamplerSpec,
                       count: int) -> dict[str, float]:
        """MSE and SSIM of the 10-frame rollout of the first ``count`` clips: means, and SSIM at frames 1, 5, 10."""
        _, target, video = self.rollout(unet, scheduler, sampler, count)
        ssim = ssim_per_frame(video, target).mean(0)
        return {"mse": mse_per_frame(video, target).mean().item(), "ssim": ssim.mean().item(),
                "ssim_f1": ssim[0].item(), "ssim_f5": ssim[4].item(), "ssim_f10": ssim[9].item()}


def write_sample_gif(unet: MCVDUNet2DModel, scheduler: DDPMScheduler, validation: ValidationSet, config: TrainConfig,
                     path: Path) -> Path:
    """Predicts the first ``sample_clips`` validation clips' next 10 frames and writes past | ground truth |
    prediction; a model that cannot predict from the past alone (it needs future frames, or has no past)
    generates its one block as it was trained to."""
    from .report import comparison_gif  # plotting helpers; imported only when a GIF is due

    if can_roll_out(unet):
        past, target, video = validation.rollout(unet, scheduler, config.sample_sampler, config.sample_clips)
        return comparison_gif(path, past, target, {"prediction": video})
    sampler = config.sample_sampler
    pipe = MCVDPipeline(unet=unet, scheduler=sampler.build(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    past, current, future = unet.split_clip(validation.clips[: config.sample_clips, : unet.clip_length].to(pipe.device))
    video = pipe(past if past.shape[1] else None, future_frames=future, batch_size=len(past),
                 num_inference_steps=sampler.steps, generator=torch.Generator(pipe.device).manual_seed(0)).frames
    return comparison_gif(path, past.cpu(), current.cpu(), {"prediction": video.cpu()})


def can_roll_out(unet: MCVDUNet2DModel) -> bool:
    """Whether the model predicts from past frames alone, so that it can be rolled out to 10 frames."""
    return unet.config.num_past_frames > 0 and unet.can_generate_without_future
