"""The general model this repository ships (checkpoints/mmnist-general): one network, MCVD's three tasks.
On bundled MNIST test digits, with the sampler it ships with, it predicts better than copying the last
frame, interpolates better than a linear cross-fade, and generates frames in which the digit classifier
reads a digit confidently, where noise never has one."""

from pathlib import Path

import torch

from mcvd_diffusers import MCVDPipeline
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.data.moving_mnist import build_test_set, clips_to_video
from mcvd_diffusers.digit_classifier import load_digit_classifier
from mcvd_diffusers.evaluation import copy_last_frame, cross_fade
from mcvd_diffusers.metrics import mse_per_frame
from mcvd_diffusers.tasks import generation_scores, read_digits

GENERAL = Path(__file__).resolve().parents[1] / "checkpoints" / "mmnist-general"
# Measured on these clips when the model shipped (8,000 fine-tuning steps; torch 2.14.1, 2-core Intel Xeon with
# native bf16, fp32): prediction MSE 0.0240 vs copy-last 0.0562 (the prediction model: 0.0238); interpolation
# MSE 0.0100 vs cross-fade 0.0328; 36% of generated digit windows read confidently (DDIM-20), noise's 0%. The
# margins keep under half of each gap: a model that lost a task fails, other CPUs' rounding has room.
PREDICT_MARGIN = 0.015
INTERPOLATE_MARGIN = 0.011
CONFIDENT_MIN = 0.15


def _pipe():
    pipe = MCVDPipeline.from_pretrained(GENERAL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clips(count: int):
    clips = build_test_set(load_mnist("test", root="bundled"), num_clips=count).with_format("torch", dtype=torch.uint8)
    return clips_to_video(clips[:]["frames"])


def _generators(count: int):
    return [torch.Generator().manual_seed(i) for i in range(count)]


def test_general_model_predicts_better_than_copying_the_last_frame():
    video = _clips(4)
    past, future = video[:, :5], video[:, 5:15]
    predicted = _pipe()(past, generator=_generators(4)).frames  # 10 frames, 5 blocks of 2
    mse = mse_per_frame(predicted, future).mean().item()
    copy_mse = mse_per_frame(copy_last_frame(past, 10), future).mean().item()
    print(f"prediction MSE {mse:.4f} vs copy-last {copy_mse:.4f}")
    assert mse < copy_mse - PREDICT_MARGIN, (mse, copy_mse)


def test_general_model_interpolates_better_than_a_cross_fade():
    video = _clips(4)
    past, gap, after = video[:, :5], video[:, 5:7], video[:, 7:9]
    filled = _pipe()(past, future_frames=after, num_frames=2, generator=_generators(4)).frames
    mse = mse_per_frame(filled, gap).mean().item()
    fade_mse = mse_per_frame(cross_fade(past, after, 2), gap).mean().item()
    print(f"interpolation MSE {mse:.4f} vs cross-fade {fade_mse:.4f}")
    assert mse < fade_mse - INTERPOLATE_MARGIN, (mse, fade_mse)


def test_general_model_generates_digits_where_noise_has_none():
    generated = _pipe()(batch_size=8, num_frames=4, num_inference_steps=20,  # 2 blocks from nothing, DDIM-20
                        generator=_generators(8)).frames
    noise = ((torch.randn(generated.shape, generator=torch.Generator().manual_seed(0)) + 1) / 2).clamp(0, 1)
    classifier = load_digit_classifier()
    scores = generation_scores(*read_digits(classifier, generated, 2), generated)
    noise_scores = generation_scores(*read_digits(classifier, noise, 2), noise)
    print(f"confident digit windows: generated {scores['confident']:.3f}, noise {noise_scores['confident']:.3f}")
    assert noise_scores["confident"] == 0
    assert scores["confident"] > CONFIDENT_MIN, scores
