"""Block-wise prediction scored on the whole task: models that generate 1, 2 or 5 frames per pass are
rolled out to the 10 frames after the past; x0 relative to the last past frame; context noise."""

import pytest
import torch

from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel, make_noise_scheduler
from mcvd_diffusers.config import TrainConfig, build_unet
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.losses import augment_past, diffusion_loss
from mcvd_diffusers.metrics import mse_per_frame, ssim_per_frame
from mcvd_diffusers.schedulers import SamplerSpec
from mcvd_diffusers.validation import PREDICTED_FRAMES, ValidationSet


def block_config(**overrides) -> TrainConfig:
    return TrainConfig.from_dict({"preset": "tiny", "mnist_root": "bundled", "image_size": 32, "num_past_frames": 2,
                                  "num_current_frames": 2, "prediction_type": "sample", "val_clips": 6, **overrides})


def test_context_noise_touches_only_the_past_with_a_std_drawn_per_clip():
    clip = torch.rand(2000, 5, 1, 32, 32)
    noisy = augment_past(clip, 2, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, 2:], clip[:, 2:])
    std = ((noisy[:, :2] - clip[:, :2]) * 2).flatten(1).std(1)  # measured on [-1, 1] data
    assert std.max() < 0.2 * 1.1 and std.min() < 0.005  # uniform in [0, 0.2]: some clips nearly clean
    assert std.mean().item() == pytest.approx(0.1, abs=0.005)


def test_loss_without_context_noise_draws_nothing_more():
    config = block_config()
    unet, scheduler = build_unet(config), make_noise_scheduler(prediction_type="sample")
    clip = torch.rand(3, unet.clip_length, 1, 32, 32)
    plain = diffusion_loss(unet, scheduler, clip, torch.Generator().manual_seed(1))
    off = diffusion_loss(unet, scheduler, clip, torch.Generator().manual_seed(1), past_noise_augment=0.0)
    on = diffusion_loss(unet, scheduler, clip, torch.Generator().manual_seed(1), past_noise_augment=0.5)
    assert torch.equal(plain, off) and not torch.equal(plain, on)


@pytest.mark.parametrize("overrides, message", [
    ({"past_noise_augment": 1.5}, r"past_noise_augment must be in \[0, 1\]"),
    ({"past_noise_augment": -0.1}, r"past_noise_augment must be in \[0, 1\]"),
    ({"val_rollout_clips": -1}, "val_rollout_clips must be >= 0"),
])
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        block_config(**overrides)


def test_validation_rolls_a_two_frame_model_out_to_the_ten_frames_after_the_past():
    config = block_config()
    torch.manual_seed(0)
    unet = build_unet(config).eval()
    validation = ValidationSet(load_mnist("val", root="bundled"), unet, config)
    assert validation.clips.shape[1] == 2 + PREDICTED_FRAMES  # more than the model's 4-frame training clip
    sampler = SamplerSpec.parse("ddim:2")
    scheduler = make_noise_scheduler(prediction_type="sample")
    past, target, video = validation.rollout(unet, scheduler, sampler, 4)
    assert torch.equal(past, validation.clips[:4, :2]) and torch.equal(target, validation.clips[:4, 2:12])
    assert video.shape == (4, 10, 1, 32, 32)
    scores = validation.rollout_scores(unet, scheduler, sampler, 4)
    ssim = ssim_per_frame(video, target).mean(0)
    assert scores["mse"] == pytest.approx(mse_per_frame(video, target).mean().item(), rel=1e-6)
    assert (scores["ssim"], scores["ssim_f1"], scores["ssim_f10"]) == pytest.approx(
        (ssim.mean().item(), ssim[0].item(), ssim[9].item()), rel=1e-6)


def test_the_conditioning_window_slides_onto_each_generated_block():
    unet = MCVDUNet2DModel.from_preset("tiny", num_past_frames=5, num_current_frames=2, sample_size=32)
    pipe = MCVDPipeline(unet=unet, scheduler=make_noise_scheduler(prediction_type="sample"))
    past, block = torch.rand(3, 5, 1, 32, 32), torch.rand(3, 2, 1, 32, 32)
    slid = pipe.slide_past(past, block)
    assert torch.equal(slid, torch.cat([past[:, 2:], block], dim=1))  # the 3 newest past frames, then the block
    started = pipe.slide_past(None, block)  # generation: a masked (zero) past before the first generated frames
    assert started.shape == (3, 5, 1, 32, 32) and torch.equal(started[:, 3:], block)
    assert not started[:, :3].any()
    without_past = MCVDPipeline(unet=MCVDUNet2DModel.from_preset("tiny", num_past_frames=0, num_current_frames=2,
                                                                 sample_size=32),
                                scheduler=make_noise_scheduler(prediction_type="sample"))
    assert without_past.slide_past(None, block) is None
