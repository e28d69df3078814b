import copy

import pytest
import torch

from mcvd_diffusers import MCVDUNet2DModel, make_noise_scheduler
from mcvd_diffusers.runtime import autocast, check_precision, maybe_compile, to_channels_last
from mcvd_diffusers.config import TrainConfig
from mcvd_diffusers.losses import diffusion_loss
from mcvd_diffusers.trainer import train


def loss_and_grads(unet, clip, precision="fp32"):
    with autocast(precision, "cpu"):
        loss = diffusion_loss(unet, make_noise_scheduler(), clip, torch.Generator().manual_seed(0))
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in unet.parameters()])


def test_fast_paths_keep_results_within_tolerance():
    torch.manual_seed(0)
    unet = MCVDUNet2DModel.from_preset("tiny", sample_size=32, num_past_frames=2, num_current_frames=3)
    clip = torch.rand(4, 5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(copy.deepcopy(unet), clip)
    nhwc_loss, nhwc_grads = loss_and_grads(to_channels_last(copy.deepcopy(unet)), clip)
    assert nhwc_loss == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(nhwc_grads, grads, rtol=1e-3, atol=1e-6)
    bf16_loss, _ = loss_and_grads(copy.deepcopy(unet), clip, precision="bf16")
    assert bf16_loss == pytest.approx(loss, rel=0.05)  # bf16 keeps 8 bits of mantissa
    # Fused AdamW makes the same updates from the same gradients.
    results = []
    for fused in (None, True):
        params = [torch.nn.Parameter(p.detach().clone()) for p in unet.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused)
        for _ in range(3):
            for p, g in zip(params, grads.split([p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)


def test_a_precision_the_device_cannot_run_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        check_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="fp16 mixed precision .* needs a CUDA device"):
        check_precision("fp16", "cpu")
    config = TrainConfig.from_dict(dict(mnist_root="bundled", mixed_precision="fp16", max_steps=1,
                                        output_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_compile_falls_back_to_eager_with_a_warning():
    unet = MCVDUNet2DModel.from_preset("tiny", sample_size=32, num_past_frames=2, num_current_frames=3).eval()
    x, past = torch.randn(1, 3, 1, 32, 32), torch.randn(1, 2, 1, 32, 32)
    with torch.no_grad():
        expected = unet(x, 5, past).sample

    def broken():
        raise RuntimeError("no C++ compiler")

    with pytest.warns(UserWarning, match="torch.compile is unavailable here .*no C\\+\\+ compiler.*running eager"):
        assert maybe_compile(unet, broken) is False
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 5, past).sample, expected)
