"""The conventions diffusers' generic pipeline tests check, on a tiny untrained MCVD pipeline: save/load round
trips (safetensors, .bin, variants), list inputs vs a batch, dict vs tuple outputs, dtypes, several futures per
input, given initial noise, and step-end callbacks that change the sampling."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from conftest import make_tiny_pipeline
from mcvd_diffusers import MCVDPipeline
from mcvd_diffusers.schedulers import make_sampler

STEPS = 2


@pytest.fixture
def pipe():
    pipe = make_tiny_pipeline()
    pipe.scheduler = make_sampler("ddim", pipe.scheduler.config)  # deterministic with eta=0
    return pipe


@pytest.fixture
def past():
    return torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))  # 2 videos of 2 past frames


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def run(pipe, past, **kwargs):
    return pipe(past, num_inference_steps=STEPS, **{"num_frames": 5, **kwargs}).frames


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_load_round_trip_with_safetensors_or_bin(pipe, past, tmp_path, safe_serialization):
    pipe.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = sorted(p.name for p in (tmp_path / "unet").iterdir() if p.name.startswith("diffusion_pytorch_model"))
    assert weights == ["diffusion_pytorch_model." + ("safetensors" if safe_serialization else "bin")]
    loaded = MCVDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, past, generator=gens(2)), run(pipe, past, generator=gens(2)),
                               rtol=0, atol=0)
    if not safe_serialization:
        assert MCVDPipeline.from_pretrained(tmp_path, use_safetensors=False).unet.conv_in.weight.equal(
            pipe.unet.conv_in.weight)
        with pytest.raises(FileNotFoundError, match=r"holds no \.safetensors weight file"):
            MCVDPipeline.from_pretrained(tmp_path, use_safetensors=True)


def test_bin_weights_are_checked_and_never_unpickle_code(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    del state["conv_in.bias"]
    torch.save(state, weights)
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\): conv_in.bias"):
        MCVDPipeline.from_pretrained(tmp_path)
    torch.save({"payload": PIL.Image.new("L", (2, 2))}, weights)  # a pickle of an arbitrary object
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin is corrupt or truncated .*UnpicklingError"):
        MCVDPipeline.from_pretrained(tmp_path)
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin is corrupt or truncated"):
        MCVDPipeline.from_pretrained(tmp_path)


def test_weight_variants_load_by_name_and_a_missing_one_is_diffusers_value_error(pipe, past, tmp_path):
    pipe.save_pretrained(tmp_path, variant="ema")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.ema.safetensors").is_file()
    loaded = MCVDPipeline.from_pretrained(tmp_path, variant="ema")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, past, generator=gens(2)), run(pipe, past, generator=gens(2)),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`variant=fp16`, but no such modeling files are available"):
        MCVDPipeline.from_pretrained(tmp_path, variant="fp16")
    with pytest.raises(FileNotFoundError, match="holds no .safetensors or .bin weight file"):
        MCVDPipeline.from_pretrained(tmp_path)  # only a variant: the plain name is not there either


def test_a_list_of_videos_is_the_batch_and_each_video_alone_gives_its_own_result(pipe, past):
    batch = run(pipe, past, generator=gens(2))
    as_list = run(pipe, [past[0], past[1].numpy()], generator=gens(2))
    torch.testing.assert_close(as_list, batch, rtol=0, atol=0)
    alone = run(pipe, [past[1]], generator=gens(1, seed=1))
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-5)  # batched convolutions round differently
    # PIL frames (mode L, as output_type="pil" writes them) read like the uint8 frames they hold
    uint8 = (past * 255).round().to(torch.uint8)
    pil = [[PIL.Image.fromarray(frame.numpy(), mode="L") for frame in video] for video in uint8]
    torch.testing.assert_close(run(pipe, pil, generator=gens(2)), run(pipe, uint8, generator=gens(2)),
                               rtol=0, atol=0)


def test_a_list_of_batches_is_joined_in_order_and_a_list_of_pil_frames_is_one_video(pipe, past):
    batch = run(pipe, past, generator=gens(2))
    grey_batches = run(pipe, [past[:1], past[1:].numpy()], generator=gens(2))  # (B, F, H, W) each
    torch.testing.assert_close(grey_batches, batch, rtol=0, atol=0)
    batches_5d = run(pipe, [past[:1, :, None], past[1:, :, None]], generator=gens(2))  # (B, F, C, H, W) each
    torch.testing.assert_close(batches_5d, batch, rtol=0, atol=0)
    uint8 = (past[1:] * 255).round().to(torch.uint8)
    frames = [PIL.Image.fromarray(frame.numpy(), mode="L") for frame in uint8[0]]  # one video, not a list of them
    one_video = run(pipe, frames, generator=gens(1, seed=1))
    assert one_video.shape == (1, 5, 1, 32, 32)
    torch.testing.assert_close(one_video, run(pipe, uint8, generator=gens(1, seed=1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"must share one shape and dtype, got \(2, 1, 32, 32\) .*\(2, 32, 32\)"):
        run(pipe, [past[:1], past[1:, :, None]])  # a batch of grey (F, H, W) videos beside one of (F, C, H, W)


def test_latent_output_is_the_denoised_sample_before_post_processing(pipe, past):
    latent = run(pipe, past, generator=gens(2), output_type="latent")
    assert latent.shape == (2, 5, 1, 32, 32) and latent.min() < -0.5  # [-1, 1], as the UNet works
    torch.testing.assert_close(((latent + 1) / 2).clamp(0, 1), run(pipe, past, generator=gens(2)), rtol=0, atol=1e-6)

    def zero_at_the_last_step(pipeline, i, t, kwargs):  # diffusers' generic callback check
        return {"latents": kwargs["latents"] * 0} if i == pipeline.num_timesteps - 1 else kwargs

    zeroed = run(pipe, past, generator=gens(2), output_type="latent", callback_on_step_end=zero_at_the_last_step)
    assert zeroed[:, 3:].abs().sum() == 0 and zeroed[:, :3].abs().sum() > 1  # only the last block's last step


def test_tuple_output_and_output_types_hold_the_same_frames(pipe, past):
    frames = run(pipe, past, generator=gens(2))
    (as_tuple,) = pipe(past, num_frames=5, num_inference_steps=STEPS, generator=gens(2), return_dict=False)
    torch.testing.assert_close(as_tuple, frames, rtol=0, atol=0)
    array = run(pipe, past, generator=gens(2), output_type="np")
    assert array.shape == (2, 5, 32, 32, 1)
    np.testing.assert_allclose(array, frames.permute(0, 1, 3, 4, 2).numpy(), rtol=0, atol=1e-6)
    images = run(pipe, past, generator=gens(2), output_type="pil")
    assert len(images) == 2 and len(images[0]) == 5 and images[0][0].mode == "L"


def test_bf16_pipeline_follows_the_fp32_one(pipe, past):
    noise = torch.randn(2, 6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = run(pipe, past, latents=noise)
    pipe.to(torch.bfloat16)
    low = run(pipe, past, latents=noise.bfloat16())
    assert low.dtype == torch.float32 and low.shape == reference.shape
    assert (low - reference).abs().mean() < 0.02  # same noise, same network: bf16 rounding only (0.0016 measured)
    with pytest.raises(ValueError, match="latents must be torch.bfloat16 on cpu like the UNet, got torch.float32"):
        run(pipe, past, latents=torch.randn(2, 6, 1, 32, 32))


def test_num_videos_per_prompt_draws_several_futures_of_each_input(pipe, past):
    futures = run(pipe, past, num_videos_per_prompt=3, generator=gens(6))
    assert futures.shape == (6, 5, 1, 32, 32)
    by_hand = run(pipe, past.repeat_interleave(3, dim=0), generator=gens(6))
    torch.testing.assert_close(futures, by_hand, rtol=0, atol=0)
    assert (futures[0] - futures[1]).abs().mean() > 0.01  # other noise, other futures of the same past


def test_given_latents_replace_the_generators_noise(pipe, past):
    generator = torch.Generator().manual_seed(0)
    # the noise the pipeline itself draws: one block of 3 frames at a time, 2 blocks for 5 frames
    noise = torch.cat([randn_tensor((2, 3, 1, 32, 32), generator=generator) for _ in range(2)], dim=1)
    drawn = run(pipe, past, generator=torch.Generator().manual_seed(0))
    given = run(pipe, past, latents=noise)
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)
    other = run(pipe, past, latents=-noise)
    assert (other - given).abs().mean() > 0.01


def test_a_step_end_callback_sees_every_step_and_its_latents_are_used(pipe, past):
    seen = []

    def shrink(pipeline, i, t, kwargs):
        seen.append((i, int(t), pipeline.num_timesteps))
        return {"latents": kwargs["latents"] * 0}  # every block ends on zeros: mid-grey frames

    frames = run(pipe, past, generator=gens(2), callback_on_step_end=shrink,
                 callback_on_step_end_tensor_inputs=["latents"])
    assert [i for i, _, _ in seen] == list(range(4)) and {n for _, _, n in seen} == {4}  # 2 blocks x 2 steps
    assert pipe.num_timesteps == 4
    torch.testing.assert_close(frames, torch.full_like(frames, 0.5), rtol=0, atol=0)
    untouched = run(pipe, past, generator=gens(2))
    assert (untouched - 0.5).abs().mean() > 0.05


def test_pipeline_callback_objects_and_interrupt(pipe, past):
    class Stop(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            pipeline._interrupt = step_index == 0  # stop after the first step
            return callback_kwargs

    calls = []
    hook = pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    pipe(past, num_frames=5, num_inference_steps=STEPS, callback_on_step_end=MultiPipelineCallbacks([Stop()]))
    hook.remove()
    assert len(calls) == 1 and pipe.interrupt
