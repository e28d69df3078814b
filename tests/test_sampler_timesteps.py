"""Training only the noise levels a few-step sampler visits (train_on_sampler_timesteps): the grid is the one
the pipeline really denoises on, training and the validation loss draw from it, and a mismatched config is
refused."""

import pytest
import torch

from mcvd_diffusers import MCVDPipeline, make_noise_scheduler
from mcvd_diffusers.config import TrainConfig, build_unet, training_timesteps
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.losses import diffusion_loss
from mcvd_diffusers.schedulers import SamplerSpec
from mcvd_diffusers.validation import ValidationSet


def grid_config(**overrides) -> TrainConfig:
    return TrainConfig.from_dict({"preset": "tiny", "mnist_root": "bundled", "image_size": 32, "num_past_frames": 2,
                                  "num_current_frames": 2, "prediction_type": "sample", "val_clips": 7,
                                  "train_on_sampler_timesteps": True, "sample_sampler": "ddim:3",
                                  "export_sampler": "ddim:3", **overrides})


def record_timesteps(unet) -> list[int]:
    """Makes ``unet`` append every timestep its forward is called with to the returned list."""
    seen, forward = [], unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.extend(torch.as_tensor(timestep).flatten().tolist())
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = spy
    return seen


def test_the_grid_is_what_the_pipeline_denoises_on():
    config = grid_config()
    grid = training_timesteps(config)
    assert grid.tolist() == [999, 666, 332]  # trailing spacing: sampling starts at pure noise
    assert SamplerSpec.parse("ddim:5").timesteps(make_noise_scheduler().config).tolist() == [999, 799, 599, 399, 199]
    torch.manual_seed(0)
    unet = build_unet(config).eval()
    seen = record_timesteps(unet)
    pipe = MCVDPipeline(unet=unet, scheduler=config.export_sampler.build(make_noise_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    pipe(torch.rand(1, 2, 32, 32), num_frames=4, num_inference_steps=3)
    assert seen == grid.tolist() * 2  # two 2-frame blocks, each on the grid


def test_training_and_the_validation_loss_draw_only_the_grid():
    config = grid_config()
    unet, scheduler = build_unet(config), make_noise_scheduler(prediction_type="sample")
    seen = record_timesteps(unet)
    clip = torch.rand(64, unet.clip_length, 1, 32, 32)
    diffusion_loss(unet, scheduler, clip, torch.Generator().manual_seed(0), timesteps=training_timesteps(config))
    assert sorted(set(seen)) == [332, 666, 999] and len(seen) == 64
    seen.clear()
    diffusion_loss(unet, scheduler, clip, torch.Generator().manual_seed(0))  # the default: the whole schedule
    assert len(set(seen)) > 50 and min(seen) < 100
    validation = ValidationSet(load_mnist("val", root="bundled"), unet, config)
    assert validation.timesteps.tolist() == [999, 666, 332, 999, 666, 332, 999]
    plain = ValidationSet(load_mnist("val", root="bundled"), unet, grid_config(train_on_sampler_timesteps=False))
    assert len(set(plain.timesteps.tolist())) == 7 and training_timesteps(grid_config(
        train_on_sampler_timesteps=False)) is None


def test_a_grid_other_than_the_validation_samplers_is_refused():
    with pytest.raises(ValueError, match=r"train_on_sampler_timesteps trains export_sampler's grid \(ddim:3\), so "
                                         r"sample_sampler \(the validation rollout's\) must be the same, got ddim:5"):
        grid_config(sample_sampler="ddim:5")
