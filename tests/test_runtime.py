import copy
import warnings
from pathlib import Path

import pytest
import torch

from mcvd_diffusers import MCVDUNet2DModel, make_noise_scheduler, runtime
from mcvd_diffusers.runtime import (autocast, check_precision, describe_precision, maybe_compile, precision_info,
                                    resolve_precision, to_channels_last)
from mcvd_diffusers.config import TrainConfig, check_resume_compatible
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


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Sets whether "this CPU" has native bf16 (and names it); the emulation warning is re-armed."""
    monkeypatch.setattr(runtime, "_warned_emulated_bf16", False)
    monkeypatch.setattr(runtime, "cpu_model_name", lambda: "AMD EPYC 7B13")

    def native(flag: bool):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: flag)

    return native


def test_auto_precision_is_bf16_only_where_the_hardware_runs_it_natively(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    assert resolve_precision("auto", "cpu") == resolve_precision("auto", "cpu", fp32="fp32") == "bf16"
    info = precision_info("auto", "cpu")
    assert {k: info[k] for k in ("requested", "resolved", "cpu_model", "cpu_native_bf16")} == {
        "requested": "auto", "resolved": "bf16", "cpu_model": "AMD EPYC 7B13", "cpu_native_bf16": True}
    assert describe_precision(info) == "precision: bf16 (auto: this CPU has native bf16: AMD EPYC 7B13)"
    cpu_bf16(False)
    assert resolve_precision("auto", "cpu") == "no" and resolve_precision("auto", "cpu", fp32="fp32") == "fp32"
    assert describe_precision(precision_info("auto", "cpu")) == (
        "precision: fp32 (auto: this CPU has no native bf16 (AVX512-BF16 or AMX): AMD EPYC 7B13)")
    # a CUDA device (faked: only the support check is asked): bf16 where the GPU runs it natively
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(runtime, "cuda_has_native_bf16", lambda device, native=native: native)
        assert resolve_precision("auto", "cuda") == expected
    # explicit values as they are, fp32 under either name
    cpu_bf16(True)
    assert [resolve_precision(p, "cpu") for p in ("no", "fp32", "bf16")] == ["no", "no", "bf16"]
    assert resolve_precision("no", "cpu", fp32="fp32") == "fp32"
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; choose one of auto, no \(or fp32\), bf16, fp16"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="fp16 mixed precision .* needs a CUDA device"):
        resolve_precision("fp16", "cpu")  # refused, as before auto


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns_once(cpu_bf16):
    cpu_bf16(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_precision("bf16", "cpu")  # native: nothing to say
    cpu_bf16(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("auto", "cpu") == "no"  # auto never picks the slow path
        for _ in range(3):
            assert resolve_precision("bf16", "cpu") == "bf16"  # asked for: it runs, with one warning
        precision_info("bf16", "cpu")
    (warning,) = [str(w.message) for w in caught]
    assert "AMD EPYC 7B13" in warning and "no native bf16" in warning and "23 s" in warning and "1.2 s" in warning


def test_cpu_model_name_falls_back_to_the_platform(monkeypatch, tmp_path):
    runtime.cpu_model_name.cache_clear()
    try:
        assert runtime.cpu_model_name()  # whatever this machine is
        runtime.cpu_model_name.cache_clear()
        monkeypatch.setattr(runtime, "Path", lambda _: tmp_path / "no-cpuinfo")
        monkeypatch.setattr(runtime.platform, "processor", lambda: "fake-processor")
        assert runtime.cpu_model_name() == "fake-processor"
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: avx2\n")
        monkeypatch.setattr(runtime, "Path", lambda _: cpuinfo)
        runtime.cpu_model_name.cache_clear()
        assert runtime.cpu_model_name() == "AMD EPYC 7B13 64-Core Processor"
    finally:
        runtime.cpu_model_name.cache_clear()


def test_mixed_precision_values():
    assert TrainConfig().mixed_precision == "auto"
    assert TrainConfig(mixed_precision="fp32").mixed_precision == "no"  # one spelling of fp32 in what a run records
    assert TrainConfig.from_dict({"mixed_precision": False}).mixed_precision == "no"  # YAML's reading of `no`
    with pytest.raises(ValueError, match=r"mixed_precision must be one of auto, no \(or fp32\), bf16, fp16, "
                                         r"got 'BF16'"):
        TrainConfig(mixed_precision="BF16")


@pytest.mark.parametrize("saved, saved_ran, now, runs, outcome", [
    ("bf16", None, "auto", "bf16", "ok"),  # saved explicitly (before auto existed): auto resolves to the same
    ("no", None, "auto", "no", "ok"),
    ("no", "no", "fp32", "no", "ok"),
    ("auto", "bf16", "bf16", "bf16", "ok"),  # and the other way round
    ("auto", "bf16", "auto", "bf16", "ok"),
    ("auto", "bf16", "auto", "no", "warns"),  # a run that follows the hardware goes on following it, said once
    ("bf16", "bf16", "auto", "no", r"mixed_precision: checkpoint 'bf16', now 'auto' \(resolves to 'no' here\)"),
    ("no", "no", "bf16", "bf16", r"mixed_precision: checkpoint 'no', now 'bf16'"),
    ("auto", "bf16", "no", "no", r"mixed_precision: checkpoint 'auto' \(ran as 'bf16'\), now 'no'"),
])
def test_resuming_compares_the_precision_that_runs(saved, saved_ran, now, runs, outcome):
    config = TrainConfig(mixed_precision=now)
    checkpoint = {**config.to_dict(), "mixed_precision": saved}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome in ("ok", "warns"):
            check_resume_compatible(checkpoint, config, Path("checkpoint-9"), runs, saved_ran)
        else:
            with pytest.raises(ValueError, match="cannot resume checkpoint-9 with this config: " + outcome):
                check_resume_compatible(checkpoint, config, Path("checkpoint-9"), runs, saved_ran)
    messages = [str(w.message) for w in caught]
    if outcome == "warns":
        assert len(messages) == 1 and "trained in 'bf16', in 'no'" in messages[0]
    else:
        assert messages == []
