import hashlib
import json
import types

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_pipeline
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from safetensors.torch import load_file, save_file

from mcvd_diffusers import MCVDPipeline, make_noise_scheduler, make_sampler, pipeline_mcvd

SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def past():
    return torch.rand(2, 2, 32, 32, generator=gen(5))


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_any_diffusers_scheduler_and_every_output_type(tiny_pipe, past, scheduler_cls):
    tiny_pipe.scheduler = scheduler_cls.from_config(tiny_pipe.scheduler.config)
    pt = tiny_pipe(past, num_inference_steps=4, generator=gen()).frames
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 1, 32, 32)
    assert pt.std() > 0.01  # not a constant video
    np_frames = tiny_pipe(past, num_inference_steps=4, generator=gen(), output_type="np").frames
    assert isinstance(np_frames, np.ndarray) and np_frames.shape == (2, 3, 32, 32, 1)
    np.testing.assert_allclose(np_frames, pt.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    pil = tiny_pipe(past, num_inference_steps=4, generator=gen(), output_type="pil").frames
    assert len(pil) == 2 and len(pil[0]) == 3 and isinstance(pil[0][0], PIL.Image.Image)
    assert pil[0][0].size == (32, 32)
    pixels = torch.from_numpy(np.array(pil[1][2])).float()  # the same frame as 8-bit grey
    assert (pixels - pt[1, 2, 0] * 255).abs().max() <= 1


def test_ddim_eta_is_passed_to_the_scheduler(tiny_pipe, past):
    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    a = tiny_pipe(past, num_inference_steps=4, generator=gen(), eta=0.0).frames
    b = tiny_pipe(past, num_inference_steps=4, generator=gen(), eta=1.0).frames
    assert (a - b).abs().max() > 1e-4


def test_same_generator_same_frames_and_one_generator_per_video(tiny_pipe, past):
    a = tiny_pipe(past, num_inference_steps=3, generator=gen(1)).frames
    b = tiny_pipe(past, num_inference_steps=3, generator=gen(1)).frames
    c = tiny_pipe(past, num_inference_steps=3, generator=gen(2)).frames
    assert torch.equal(a, b) and not torch.equal(a, c)
    # With a list, video i depends on generator i only: the same as running it alone.
    batch = tiny_pipe(past, num_inference_steps=3, generator=[gen(10), gen(11)]).frames
    alone = tiny_pipe(past[1:], num_inference_steps=3, generator=[gen(11)]).frames
    torch.testing.assert_close(batch[1:], alone)


def test_sampling_runs_without_dropout_and_keeps_the_training_mode():
    pipe = make_tiny_pipeline(dropout=0.5)
    pipe.unet.train()
    past = torch.rand(1, 2, 32, 32)
    a = pipe(past, num_inference_steps=2, generator=gen()).frames
    b = pipe(past, num_inference_steps=2, generator=gen()).frames
    assert torch.equal(a, b) and pipe.unet.training


def test_uint8_and_numpy_inputs_match_float_input(tiny_pipe):
    past_u8 = torch.randint(0, 256, (1, 2, 32, 32), dtype=torch.uint8, generator=gen())
    from_float = tiny_pipe(past_u8.float() / 255, num_inference_steps=2, generator=gen()).frames
    from_u8 = tiny_pipe(past_u8, num_inference_steps=2, generator=gen()).frames
    from_np = tiny_pipe(past_u8.numpy()[:, :, None], num_inference_steps=2, generator=gen()).frames
    torch.testing.assert_close(from_u8, from_float)
    torch.testing.assert_close(from_np, from_float)


def test_rollout_slides_the_window_onto_generated_frames(tiny_pipe, past):
    tiny_pipe.scheduler = make_sampler("ddim", tiny_pipe.scheduler.config)
    seen = []
    hook = tiny_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["past_frames"].clone()), with_kwargs=True
    )
    long = tiny_pipe(past, num_frames=7, num_inference_steps=2, generator=gen()).frames
    hook.remove()
    assert long.shape == (2, 7, 1, 32, 32)
    assert len(seen) == 3 * 2  # ceil(7 / 3) blocks of 2 steps
    torch.testing.assert_close(seen[0], past[:, :, None] * 2 - 1)
    # Block 2 is conditioned on the last two frames of block 1, block 3 on those of block 2.
    torch.testing.assert_close((seen[2] + 1) / 2, long[:, 1:3], atol=1e-5, rtol=0)
    torch.testing.assert_close((seen[4] + 1) / 2, long[:, 4:6], atol=1e-5, rtol=0)
    one_block = tiny_pipe(past, num_frames=3, num_inference_steps=2, generator=gen()).frames
    torch.testing.assert_close(long[:, :3], one_block)


def test_unconditional_generation_needs_a_model_trained_with_past_masking(tiny_pipe):
    with pytest.raises(ValueError, match="trained without past masking"):
        tiny_pipe(past_frames=None, num_inference_steps=2)
    masked = make_tiny_pipeline(prob_mask_past=0.5)
    videos = masked(batch_size=3, num_frames=5, num_inference_steps=2, generator=gen()).frames
    assert videos.shape == (3, 5, 1, 32, 32)


def test_interpolation_uses_future_frames():
    interp = make_tiny_pipeline(num_future_frames=2)
    past, future = torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32)
    with pytest.raises(ValueError, match="pass future_frames"):
        interp(past, num_inference_steps=2)
    filled = interp(past, future_frames=future, num_inference_steps=2, generator=gen()).frames
    assert filled.shape == (1, 3, 1, 32, 32)
    other = interp(past, future_frames=1 - future, num_inference_steps=2, generator=gen()).frames
    assert (filled - other).abs().max() > 1e-4
    with pytest.raises(ValueError, match="interpolation fills exactly num_current_frames=3"):
        interp(past, future_frames=future, num_frames=6, num_inference_steps=2)
    with pytest.raises(ValueError, match="not trained for interpolation"):
        make_tiny_pipeline()(past, future_frames=future, num_inference_steps=2)


@pytest.mark.parametrize(
    "past, kwargs, message",
    [
        (torch.rand(1, 3, 32, 32), {}, "must hold 2 frames per video"),
        (torch.rand(1, 2, 64, 64), {}, "must be 1x32x32 .*got 1x64x64"),
        (torch.rand(1, 2, 3, 32, 32), {}, "must be 1x32x32 .*got 3x32x32"),
        (torch.rand(2, 32, 32), {}, r"must have shape \(B, 2, H, W\)"),
        (torch.full((1, 2, 32, 32), float("nan")), {}, "NaN"),
        (torch.rand(1, 2, 32, 32) * 255, {}, r"must lie in \[0, 1\]"),
        (torch.rand(1, 2, 32, 32) - 0.5, {}, r"must lie in \[0, 1\]"),
        (torch.zeros(1, 2, 32, 32, dtype=torch.int32), {}, "uint8 .* or float"),
        ("frames.npy", {}, "torch.Tensor or numpy array"),
        ([[0.5]], {}, "each video of a list must be a tensor, a numpy array or a list of PIL images, got list"),
        ([torch.rand(2, 32, 32), torch.rand(2, 16, 16)], {}, r"must share one shape and dtype, got \(2, 16, 16\)"),
        ([], {}, "past_frames is an empty list"),
        (torch.rand(2, 2, 32, 32), {"generator": [torch.Generator()]}, "1 generators for 2 videos"),
        (torch.rand(1, 2, 32, 32), {"num_videos_per_prompt": 0}, "num_videos_per_prompt must be an integer >= 1"),
        (torch.rand(1, 2, 32, 32), {"latents": torch.randn(1, 2, 1, 32, 32)},
         r"latents must be a tensor of shape \(1, 3, 1, 32, 32\)"),
        (torch.rand(1, 2, 32, 32), {"latents": torch.randn(1, 3, 1, 32, 32, dtype=torch.float64)},
         "latents must be torch.float32 on cpu like the UNet, got torch.float64"),
        (torch.rand(1, 2, 32, 32), {"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs":
                                    ["noise_pred"]}, r"may name \['latents'\], got \['noise_pred'\]"),
        (torch.rand(1, 2, 32, 32), {"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
        (torch.rand(1, 2, 32, 32), {"num_inference_steps": 2.0}, "num_inference_steps must be an integer >= 1"),
        (torch.rand(1, 2, 32, 32), {"num_frames": 0}, "num_frames must be an integer >= 1"),
        (torch.rand(1, 2, 32, 32), {"output_type": "mp4"}, "output_type must be one of"),
        (torch.rand(1, 2, 32, 32), {"batch_size": 4}, "batch_size=4 but past_frames holds 1"),
        (torch.rand(0, 2, 32, 32), {}, r"past_frames holds no videos \(a batch of 0"),
    ],
)
def test_bad_input_raises_a_clear_error(tiny_pipe, past, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(past, **{"num_inference_steps": 2, **kwargs})


def test_save_and_load_give_identical_frames(tiny_pipe, past, tmp_path):
    tiny_pipe.scheduler = make_sampler("dpm++", tiny_pipe.scheduler.config)
    tiny_pipe.save_pretrained(tmp_path)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    library, class_name = json.loads((tmp_path / "model_index.json").read_text())["unet"]
    assert library.startswith("mcvd_diffusers") and class_name == "MCVDUNet2DModel"
    loaded = MCVDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DPMSolverMultistepScheduler
    expected = tiny_pipe(past, num_inference_steps=3, generator=gen()).frames
    torch.testing.assert_close(loaded(past, num_inference_steps=3, generator=gen()).frames, expected, atol=0, rtol=0)


def test_hub_repo_id_downloads_a_snapshot_then_loads_it(tiny_pipe, tmp_path, monkeypatch):
    tiny_pipe.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, token=None, cache_dir=None, local_files_only=False):
        calls.append((repo_id, revision))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(pipeline_mcvd, "snapshot_download", fake_snapshot_download)
    loaded = MCVDPipeline.from_pretrained("someone/mcvd-mmnist", revision="v1")
    assert calls == [("someone/mcvd-mmnist", "v1")]
    assert loaded.unet.config.num_past_frames == 2


def test_unreachable_hub_repo_or_mistyped_folder(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(pipeline_mcvd, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="runs/pipelin is neither a local folder nor a Hub repo.*offline"):
        MCVDPipeline.from_pretrained("runs/pipelin")


def test_missing_or_corrupt_files_give_clear_errors(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="not a folder holding a saved MCVDPipeline"):
        MCVDPipeline.from_pretrained(str(tmp_path / "nope"))
    weights = tmp_path / "ok" / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is corrupt or truncated"):
        MCVDPipeline.from_pretrained(tmp_path / "ok")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="holds no .safetensors or .bin weight file"):
        MCVDPipeline.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json is corrupt"):
        MCVDPipeline.from_pretrained(tmp_path / "ok")


def test_a_saved_pipeline_keeps_its_default_step_count(tiny_pipe, past, tmp_path):
    """pipe(past) with no step count uses the count the pipeline was saved with (numpy integers welcome)."""
    pipe = MCVDPipeline(unet=tiny_pipe.unet, scheduler=make_sampler("ddim", tiny_pipe.scheduler.config),
                        default_num_inference_steps=3)
    pipe.save_pretrained(tmp_path)
    loaded = MCVDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_num_inference_steps == 3
    calls = []
    loaded.unet.register_forward_hook(lambda *args: calls.append(1))
    default = loaded(past, generator=gen()).frames
    assert len(calls) == 3
    torch.testing.assert_close(default, loaded(past, num_inference_steps=np.int64(3), generator=gen()).frames,
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="default_num_inference_steps must be an integer >= 1, got 0"):
        MCVDPipeline(unet=tiny_pipe.unet, scheduler=tiny_pipe.scheduler, default_num_inference_steps=0)


def test_a_saved_pipeline_keeps_its_default_frame_count(tiny_pipe, past, tmp_path):
    """A model that generates 3 frames per pass, saved to answer with 7: pipe(past) rolls out to 7; a pipeline
    saved before the setting existed (or with None) generates one block."""
    import json

    assert tiny_pipe(past, num_inference_steps=1, generator=gen()).frames.shape[1] == 3  # one block
    pipe = MCVDPipeline(unet=tiny_pipe.unet, scheduler=tiny_pipe.scheduler, default_num_frames=7)
    pipe.save_pretrained(tmp_path)
    loaded = MCVDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_num_frames == 7
    default = loaded(past, num_inference_steps=2, generator=gen()).frames
    torch.testing.assert_close(default, loaded(past, num_frames=7, num_inference_steps=2, generator=gen()).frames,
                               atol=0, rtol=0)
    assert loaded(past, num_frames=4, num_inference_steps=1, generator=gen()).frames.shape[1] == 4  # a call may say
    index = json.loads((tmp_path / "model_index.json").read_text())
    del index["default_num_frames"]  # as saved before it existed
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    old = MCVDPipeline.from_pretrained(tmp_path)
    old.set_progress_bar_config(disable=True)
    assert old(past, num_inference_steps=1, generator=gen()).frames.shape[1] == 3
    with pytest.raises(ValueError, match="default_num_frames must be an integer >= 1 or None, got 0"):
        MCVDPipeline(unet=tiny_pipe.unet, scheduler=tiny_pipe.scheduler, default_num_frames=0)


def test_noise_shift_divides_every_snr_and_travels_with_the_scheduler_config():
    from mcvd_diffusers import make_noise_scheduler

    base = make_noise_scheduler(prediction_type="sample")
    shifted = make_noise_scheduler(prediction_type="sample", noise_shift=2.0)
    snr = lambda s: s.alphas_cumprod.double() / (1 - s.alphas_cumprod.double())  # noqa: E731
    torch.testing.assert_close(snr(base) / snr(shifted), torch.full((1000,), 4.0, dtype=torch.float64), rtol=1e-3,
                               atol=0)
    for name in ("ddim", "dpm++", "unipc"):  # every sampler built from the config shares the shifted schedule
        torch.testing.assert_close(make_sampler(name, shifted.config).alphas_cumprod, shifted.alphas_cumprod)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="noise_shift must be a finite number > 0"):
            make_noise_scheduler(noise_shift=bad)


# ----------------------------------------------------------------------------- schedulers
class _Oracle(torch.nn.Module):
    """Stands in for the UNet's forward: the exact prediction (x0, epsilon or v) that leads to ``target``
    from any noisy sample at a discrete timestep. A scheduler driven correctly must return ``target``."""

    def __init__(self, target: torch.Tensor, scheduler):
        super().__init__()
        self.target, self.prediction_type = target.double(), scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.double()

    def forward(self, sample, t, **kwargs):
        t = torch.as_tensor(t)
        assert t == t.round() and 0 <= t < len(self.alphas_cumprod), f"not a training timestep: {t}"
        alpha = self.alphas_cumprod[t.long()]
        noise = (sample.double() - alpha.sqrt() * self.target) / (1 - alpha).sqrt()
        prediction = {"sample": self.target, "epsilon": noise,
                      "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * self.target}[self.prediction_type]
        return types.SimpleNamespace(sample=prediction.float())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
@pytest.mark.parametrize("name", pipeline_mcvd.SUPPORTED_SCHEDULERS)
def test_every_supported_scheduler_returns_the_video_a_perfect_model_predicts(name, prediction_type):
    pipe = make_tiny_pipeline()
    trained = make_noise_scheduler(prediction_type=prediction_type)
    pipe.scheduler = getattr(diffusers, name).from_config(trained.config)
    target = torch.rand(2, 3, 1, 32, 32, generator=gen(1)) * 2 - 1  # a known video in [-1, 1]
    pipe.unet.forward = _Oracle(target, trained).forward
    try:
        # 8 divides the 1000 training steps: DDIM's last step then lands on t=-1 (clean), not on t=0
        frames = pipe(torch.rand(2, 2, 32, 32), num_inference_steps=8, generator=gen()).frames
    except NotImplementedError:  # diffusers' own refusal, e.g. Euler ancestral with x0 prediction
        pytest.skip(f"{name} does not implement prediction_type={prediction_type}")
    assert (frames * 2 - 1 - target).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "DEISMultistepScheduler",
                                  "PNDMScheduler"])
def test_schedulers_that_cannot_sample_this_model_exactly_are_refused_by_name(tiny_pipe, past, name):
    tiny_pipe.scheduler = getattr(diffusers, name).from_config(tiny_pipe.scheduler.config)
    with pytest.raises(ValueError, match=rf"{name} is not supported by MCVDPipeline.*Use one of \['DDPMScheduler'"):
        tiny_pipe(past, num_inference_steps=2)


# ----------------------------------------------------------------------------- weights
def _export(pipe, folder):
    pipe.save_pretrained(folder)
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def test_missing_or_unexpected_tensors_are_named_not_initialized_at_random(tiny_pipe, tmp_path):
    weights = _export(tiny_pipe, tmp_path)
    tensors = load_file(weights)
    dropped = "conv_in.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    with pytest.raises(ValueError, match=r"does not match the model: 1 missing tensor\(s\): conv_in\.weight$"):
        MCVDPipeline.from_pretrained(tmp_path)
    save_file({**tensors, "conv_in.scale": torch.ones(1)}, weights)
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\): conv_in\.scale"):
        MCVDPipeline.from_pretrained(tmp_path)
    save_file({**tensors, dropped: tensors[dropped][:1]}, weights)
    with pytest.raises(ValueError, match=r"tensor\(s\) of another shape: conv_in\.weight \(1, "):
        MCVDPipeline.from_pretrained(tmp_path)


def test_flipped_bytes_give_non_finite_weights_which_are_refused(tiny_pipe, tmp_path):
    weights = _export(tiny_pipe, tmp_path)
    tensors = load_file(weights)
    raw = bytearray(weights.read_bytes())
    raw[-4:] = b"\xff\xff\xff\xff"  # the last float of the last tensor becomes NaN
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"holds non-finite values \(NaN or inf\) in 1 tensor\(s\): "):
        MCVDPipeline.from_pretrained(tmp_path)
    assert len(tensors) > 1


def test_exports_record_a_sha256_per_weight_file_and_loading_verifies_it(tiny_pipe, tmp_path):
    from mcvd_diffusers.integrity import write_checksums

    weights = _export(tiny_pipe, tmp_path)
    recorded = write_checksums(tmp_path)
    assert list(recorded) == ["unet/diffusion_pytorch_model.safetensors"]
    assert recorded["unet/diffusion_pytorch_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    MCVDPipeline.from_pretrained(tmp_path)  # verifies and loads
    tensors = load_file(weights)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + 1e-3  # finite, well-formed, and not what was exported
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors is corrupt: its SHA-256 is [0-9a-f]{64}, "
                                         r"checksums\.json records [0-9a-f]{64}"):
        MCVDPipeline.from_pretrained(tmp_path)
    weights.unlink()
    save_file(tensors, tmp_path / "unet" / "extra.safetensors")
    with pytest.raises(FileNotFoundError, match=r"recorded in checksums\.json are missing: "
                                                r"unet/diffusion_pytorch_model\.safetensors"):
        MCVDPipeline.from_pretrained(tmp_path)
