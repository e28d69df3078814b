"""MCVD's three tasks in one model: the partial past mask that lets generation roll out, the warm start
that turns a predictor into a general model, and eval_mcvd.py's --task interpolate and --task generate."""

import json

import pytest
import torch

from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel, make_noise_scheduler
from mcvd_diffusers.config import TrainConfig
from mcvd_diffusers.evaluation import EvalConfig, cross_fade, evaluate
from mcvd_diffusers.losses import draw_past_keep
from mcvd_diffusers.tasks import INK_RANGE, digit_windows, generation_scores, read_digits
from mcvd_diffusers.digit_classifier import load_digit_classifier

GENERAL = dict(num_past_frames=5, num_current_frames=2, num_future_frames=2, prob_mask_past=0.5,
               prob_mask_future=0.5, partial_past_mask=True)


def tiny_general(seed=0, **overrides):
    torch.manual_seed(seed)
    return MCVDUNet2DModel.from_preset("tiny", sample_size=32, **{**GENERAL, **overrides})


def test_a_partial_past_mask_keeps_the_last_frames():
    keep = draw_past_keep(20000, tiny_general().config, torch.Generator().manual_seed(0))
    assert keep.shape == (20000, 5)
    kept = keep.sum(1)
    # kept frames are always the last ones: a masked past is zeros *before* what the rollout generated
    assert torch.equal(keep, torch.arange(5)[None] >= (5 - kept)[:, None])
    shares = torch.bincount(kept, minlength=6).double() / len(kept)
    assert abs(shares[5] - 0.5) < 0.02  # unmasked half the time (prob_mask_past)
    assert abs(shares[0] - 0.25) < 0.02  # half of the masked samples lose every past frame (MCVD's mask)
    assert all(abs(shares[k] - 0.0625) < 0.01 for k in range(1, 5))
    # MCVD's own mask (no partial_past_mask): one flag per sample, the same draws as before the option existed
    plain = tiny_general(partial_past_mask=False).config
    mask = draw_past_keep(1000, plain, torch.Generator().manual_seed(0))
    expected = torch.rand(1000, generator=torch.Generator().manual_seed(0)) >= 0.5
    assert mask.shape == (1000,) and torch.equal(mask, expected)


def test_a_per_frame_keep_mask_zeroes_only_those_frames():
    unet = tiny_general().eval()
    past, sample = torch.rand(2, 5, 1, 32, 32) * 2 - 1, torch.randn(2, 2, 1, 32, 32)
    keep = torch.tensor([[False, False, False, True, True], [True] * 5])
    zeroed = past.clone()
    zeroed[0, :3] = 0
    with torch.no_grad():
        a = unet(sample, 10, past_frames=past, keep_past=keep).sample
        b = unet(sample, 10, past_frames=zeroed).sample
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match=r"keep mask for past_frames must have shape \(2,\) or \(2, 5\)"):
        unet(sample, 10, past_frames=past, keep_past=keep[:, :3])


def test_partial_past_mask_is_validated():
    with pytest.raises(ValueError, match="partial_past_mask needs prob_mask_past > 0"):
        tiny_general(prob_mask_past=0.0)
    with pytest.raises(ValueError, match="partial_past_mask must be true or false"):
        tiny_general(partial_past_mask="yes")
    with pytest.raises(ValueError, match="partial_past_mask needs prob_mask_past > 0"):
        TrainConfig(partial_past_mask=True)


def test_generation_rolls_out_on_the_frames_generated_so_far():
    unet = tiny_general()
    pipe = MCVDPipeline(unet=unet, scheduler=make_noise_scheduler())
    pipe.set_progress_bar_config(disable=True)
    seen = []
    forward = unet.forward
    unet.forward = lambda sample, t, past_frames=None, **kw: (seen.append(past_frames), forward(
        sample, t, past_frames=past_frames, **kw))[1]
    video = pipe(batch_size=2, num_frames=6, num_inference_steps=1, output_type="pt").frames  # 3 blocks of 2
    assert video.shape == (2, 6, 1, 32, 32)
    assert seen[0] is None  # block 1: no past at all
    normalized = video * 2 - 1
    assert torch.equal(seen[1][:, :3], torch.zeros(2, 3, 1, 32, 32))  # block 2: zeros, then block 1's frames
    assert torch.allclose(seen[1][:, 3:], normalized[:, :2], atol=1e-6)
    assert torch.equal(seen[2][:, :1], torch.zeros(2, 1, 1, 32, 32))
    assert torch.allclose(seen[2][:, 1:], normalized[:, :4], atol=1e-6)
    # MCVD's full mask alone cannot: a past of 5 frames with 2 per block would mix zeros it never saw
    plain = MCVDPipeline(unet=tiny_general(partial_past_mask=False), scheduler=make_noise_scheduler())
    with pytest.raises(ValueError, match="trained with partial_past_mask; ask for at most 2 frames"):
        plain(batch_size=1, num_frames=4, num_inference_steps=1)
    assert plain(batch_size=1, num_frames=2, num_inference_steps=1, output_type="pt").frames.shape[1] == 2


def test_a_warm_start_computes_what_the_source_did():
    source = tiny_general(seed=1, num_future_frames=0, prob_mask_past=0.0, prob_mask_future=0.0,
                          partial_past_mask=False).eval()
    general = tiny_general(seed=2).eval()
    general.warm_start_from(source)
    sample, past, future = torch.randn(3, 2, 1, 32, 32), torch.rand(3, 5, 1, 32, 32), torch.rand(3, 2, 1, 32, 32)
    with torch.no_grad():
        expected = source(sample, torch.tensor([1, 400, 999]), past_frames=past).sample
        got = general(sample, torch.tensor([1, 400, 999]), past_frames=past, future_frames=future).sample
    assert torch.allclose(got, expected, atol=1e-5)  # the new future slots start at zero
    other = tiny_general(num_current_frames=3)
    with pytest.raises(ValueError, match="num_current_frames: source 3, this model 2"):
        general.warm_start_from(other)
    with pytest.raises(ValueError, match="num_future_frames: source 2 > this model's 0"):
        source.warm_start_from(general)


def test_cross_fade_blends_the_frames_around_the_gap():
    past, after = torch.zeros(1, 5, 1, 4, 4), torch.ones(1, 2, 1, 4, 4)
    past[:, -1] = 0.3
    faded = cross_fade(past, after, 2)
    assert torch.allclose(faded[0, :, 0, 0, 0], torch.tensor([0.3 + 0.7 / 3, 0.3 + 1.4 / 3]))


@pytest.fixture(scope="module")
def general_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("general")
    unet = MCVDUNet2DModel.from_preset("tiny", **GENERAL)  # 64 px, like the test clips
    MCVDPipeline(unet=unet, scheduler=make_noise_scheduler()).save_pretrained(folder)
    return folder


def eval_config(model, out, **overrides):
    values = dict(model=str(model), out=str(out), samplers=["ddim:2"], num_clips=3, samples_per_clip=2,
                  mnist_root="bundled", batch_size=4, gif_clips=2, timing=False)
    return EvalConfig(**{**values, **overrides})


def test_interpolation_is_scored_on_the_gap_beside_a_cross_fade(general_dir, tmp_path):
    record = evaluate(eval_config(general_dir, tmp_path, task="interpolate"))
    assert list(record["rows"]) == ["ground truth", "copy last frame", "linear cross-fade", "ddim:2"]
    assert record["eval_config"]["num_frames"] == 2  # the model's gap, not the default 10
    fade, copy = record["rows"]["linear cross-fade"]["metrics"], record["rows"]["copy last frame"]["metrics"]
    assert len(fade["mse"]["per_frame"]) == 2
    # a blend towards the frame after the gap is closer to the gap's second frame than copying the last past one
    assert fade["mse"]["per_frame"][1] < copy["mse"]["per_frame"][1]
    assert "Interpolation: the model sees 5 past frames" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "predictions.gif").is_file()


def test_generation_is_scored_beside_real_clips_and_noise(general_dir, tmp_path):
    record = evaluate(eval_config(general_dir, tmp_path, task="generate", num_clips=4, num_frames=4))
    assert list(record["rows"]) == ["ddim:2", "real test clips", "noise"]
    real, noise = record["rows"]["real test clips"]["scores"], record["rows"]["noise"]["scores"]
    assert real["confident"] > 0.4 and noise["confident"] == 0  # noise's ink is no digit's
    assert real["label_entropy"] > 1.0  # the clips hold several different digits
    assert len(record["rows"]["ddim:2"]["scores"]["confident_per_frame"]) == 4
    for name in ("metrics.json", "summary.md", "curves.png", "generated.gif"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "metrics.json").read_text())["task"] == "generate"


def test_generation_fvd_with_random_i3d_weights(general_dir, tmp_path):
    record = evaluate(eval_config(general_dir, tmp_path, task="generate", num_clips=4, num_frames=10, fvd=True,
                                  fvd_weights="random", fvd_size=32))
    rows = record["rows"]
    assert rows["real test clips"]["scores"]["fvd"] < 1e-6  # the real set against itself
    assert rows["noise"]["scores"]["fvd"] > 0 and rows["ddim:2"]["scores"]["fvd"] > 0
    assert "| FVD |" in (tmp_path / "summary.md").read_text()


def test_digit_windows_find_the_digits_of_real_clips(mnist_dir):
    from mcvd_diffusers.data.mnist import load_mnist
    from mcvd_diffusers.data.moving_mnist import MovingMNIST

    clips = MovingMNIST(load_mnist("val", root=mnist_dir).images, num_frames=3).sample(
        64, generator=torch.Generator().manual_seed(3))
    clips = clips if clips.ndim == 5 else clips[:, :, None]
    labels, top = read_digits(load_digit_classifier(), clips, 2)
    scores = generation_scores(labels, top, clips)
    assert scores["confident"] > 0.6 and scores["label_entropy"] > 2.5
    blank = torch.zeros(2, 3, 1, 64, 64)
    assert read_digits(load_digit_classifier(), blank, 2)[1].eq(0).all()  # no ink: no digit
    one = torch.zeros(1, 1, 1, 64, 64)
    one[..., 10:30, 30:50] = 1.0  # a block of ink far above what a digit holds
    assert one[..., 10:38, 26:54].mean() > INK_RANGE[1]
    position = digit_windows(one, 1)[0, 0, 0]
    assert abs(int(position[0]) - 6) <= 1 and abs(int(position[1]) - 26) <= 1  # centred on the ink


@pytest.mark.parametrize("overrides, message", [
    (dict(task="extrapolate"), "task must be one of"),
    (dict(task="generate", stretch=True), "no ground truth"),
])
def test_bad_task_options_fail_before_any_work(general_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluate(eval_config(general_dir, tmp_path, **overrides))
    assert not (tmp_path / "metrics.json").exists()


def test_a_model_refuses_the_tasks_it_was_not_trained_for(tmp_path):
    torch.manual_seed(0)
    predictor = MCVDUNet2DModel.from_preset("tiny", num_past_frames=5, num_current_frames=2)
    MCVDPipeline(unet=predictor, scheduler=make_noise_scheduler()).save_pretrained(tmp_path / "model")
    for task, message in (("interpolate", "no future-frame slots"), ("generate", "without past masking")):
        with pytest.raises(ValueError, match=message):
            evaluate(eval_config(tmp_path / "model", tmp_path / task, task=task))
        assert not (tmp_path / task / "metrics.json").exists()


def test_training_warm_starts_from_a_saved_pipeline(tmp_path):
    from mcvd_diffusers.trainer import train

    source = tiny_general(seed=3, num_future_frames=0, prob_mask_past=0.0, prob_mask_future=0.0,
                          partial_past_mask=False)
    MCVDPipeline(unet=source, scheduler=make_noise_scheduler()).save_pretrained(tmp_path / "predictor")
    values = dict(preset="tiny", mnist_root="bundled", image_size=32, batch_size=2, max_steps=1, learning_rate=1e-9, min_lr=0.0,
                  warmup_steps=0, lr_scheduler="constant", validate_every=0, sample_every=0, checkpoint_every=0,
                  report_to="none", mixed_precision="no", output_dir=str(tmp_path / "run"),
                  init_unet_from=str(tmp_path / "predictor"), **{**GENERAL, "num_current_frames": 2})
    exported = MCVDPipeline.from_pretrained(train(TrainConfig.from_dict(values))).unet
    theirs, mine = source.state_dict(), exported.state_dict()
    for name, tensor in theirs.items():  # one step at LR 1e-9: still the source's weights
        if name != "conv_in.weight":
            assert torch.allclose(mine[name], tensor, atol=1e-6), name
    channels = theirs["conv_in.weight"].shape[1]
    assert torch.allclose(mine["conv_in.weight"][:, :channels], theirs["conv_in.weight"], atol=1e-6)
    assert mine["conv_in.weight"][:, channels:].abs().max() < 1e-6  # the new future slots start at zero
    with pytest.raises(FileNotFoundError, match="init_unet_from: .* is neither a pipeline folder"):
        train(TrainConfig.from_dict({**values, "output_dir": str(tmp_path / "run2"),
                                     "init_unet_from": str(tmp_path)}))
