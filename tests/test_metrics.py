import math

import pytest
import torch

from mcvd_diffusers import metrics
from mcvd_diffusers.metrics import PSNR_CAP, FrameMetrics, aggregate, binarize_frames, mean_with_interval


@pytest.fixture(scope="module")
def frame_metrics():
    return FrameMetrics()


def video(seed, shape=(2, 3, 1, 64, 64)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_identical_frames_score_perfectly(frame_metrics):
    x = video(0)
    values = frame_metrics(x, x.clone())
    assert set(values) == set(metrics.METRICS) and all(v.shape == (2, 3) for v in values.values())
    assert torch.all(values["mse"] == 0)
    assert torch.all(values["psnr"] == PSNR_CAP)  # capped, not infinite
    torch.testing.assert_close(values["ssim"], torch.ones(2, 3))
    torch.testing.assert_close(values["ssim_binarized"], torch.ones(2, 3))
    assert values["lpips_alex"].abs().max() < 1e-6 and values["lpips_vgg"].abs().max() < 1e-6


def test_mse_and_psnr_by_hand(frame_metrics):
    target = torch.zeros(1, 2, 1, 8, 8)
    prediction = target.clone()
    prediction[0, 0] = 0.5  # every pixel off by 0.5: MSE 0.25, PSNR 10 log10(4)
    prediction[0, 1, 0, :4] = 1.0  # half the pixels off by 1: MSE 0.5, PSNR 10 log10(2)
    values = FrameMetrics(metrics=("mse", "psnr"))(prediction, target)
    torch.testing.assert_close(values["mse"], torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(values["psnr"], torch.tensor([[10 * math.log10(4), 10 * math.log10(2)]]))


def test_worse_predictions_score_worse(frame_metrics):
    target = video(1)
    close = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    far = video(2)
    near_values, far_values = frame_metrics(close, target), frame_metrics(far, target)
    for name in metrics.METRICS:
        better = near_values[name].mean() > far_values[name].mean()
        assert better == metrics.HIGHER_IS_BETTER[name], name


def test_binarization_rounds_at_one_half():
    frames = torch.tensor([0.0, 0.49, 0.5, 0.51, 1.0])
    assert binarize_frames(frames).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    # Grey levels on either side of 0.5 are equal once binarized: binarized SSIM is 1, raw SSIM is not.
    a, b = torch.full((1, 1, 1, 32, 32), 0.6), torch.full((1, 1, 1, 32, 32), 0.9)
    assert metrics.ssim_per_frame(a, b, binarize=True).item() == pytest.approx(1.0)
    assert metrics.ssim_per_frame(a, b).item() < 0.99


def test_best_of_k_picks_the_best_sample_per_clip():
    # 2 clips, 3 samples, 2 frames. Clip 0's best SSIM is sample 2; clip 1's is sample 0.
    ssim = torch.tensor([[[0.1, 0.3], [0.5, 0.5], [0.9, 0.7]],
                         [[0.8, 0.8], [0.2, 0.4], [0.6, 0.6]]])
    mse = 1 - ssim
    result = aggregate({"ssim": ssim, "mse": mse})
    assert result["ssim"]["per_clip_best_of_k"] == pytest.approx([0.8, 0.8])
    assert result["mse"]["per_clip_best_of_k"] == pytest.approx([0.2, 0.2])  # lowest MSE is best
    assert result["ssim"]["per_clip_mean_of_k"] == pytest.approx([(0.2 + 0.5 + 0.8) / 3, (0.8 + 0.3 + 0.6) / 3])
    assert result["ssim"]["best_of_k"]["mean"] == pytest.approx(0.8)
    assert result["ssim"]["per_frame"] == pytest.approx([ssim[..., 0].mean().item(), ssim[..., 1].mean().item()])


def test_interval_over_clips():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    stats = mean_with_interval(values)
    assert stats["mean"] == pytest.approx(2.5)
    assert stats["ci95"] == pytest.approx(1.96 * values.std().item() / 2)
    assert mean_with_interval(torch.tensor([0.7]))["ci95"] == 0.0


def test_mismatched_shapes_and_unknown_metrics_are_rejected(frame_metrics):
    with pytest.raises(ValueError, match="differ in shape"):
        frame_metrics(video(0), video(0, (2, 4, 1, 64, 64)))
    with pytest.raises(ValueError, match="unknown metrics"):
        FrameMetrics(metrics=("fvd",))


def test_missing_lpips_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth.*set TORCH_HOME"):
        metrics.load_lpips("lpips_alex")


@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")  # the lpips package loads backbones the old way
@pytest.mark.parametrize("name, net", [("lpips_alex", "alex"), ("lpips_vgg", "vgg")])
def test_lpips_agrees_with_the_reference_package(frame_metrics, name, net):
    """Our LPIPS (torchmetrics', run in channels_last) against the lpips package of Zhang et al., on grey frames
    replicated to RGB in [-1, 1] as the protocol says."""
    import lpips

    prediction, target = video(3), video(4)
    reference = lpips.LPIPS(net=net, verbose=False).eval()
    rgb = lambda x: (2 * x.flatten(0, 1) - 1).expand(-1, 3, -1, -1)  # noqa: E731
    with torch.no_grad():
        expected = reference(rgb(prediction), rgb(target)).reshape(2, 3)
    ours = frame_metrics(prediction, target)[name]
    assert expected.min() > 0.05  # random frames are far apart: a comparison that means something
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
