"""Per-frame video metrics and their aggregation (docs/DESIGN.md), on torchmetrics. Frames are (..., C, H, W) floats
in [0, 1], never post-processed. PSNR is capped at ``PSNR_CAP`` dB (identical frames would give infinity, which no
average survives); SSIM: Gaussian window 11x11, sigma 1.5; "binarized SSIM" on frames rounded to {0, 1} (MCVD's
MNIST protocol); LPIPS with AlexNet (MCVD) and VGG (the reproduction). ``FIELD_METRICS`` are the per-frame scores of
MCVD's and OpenSTL's evaluation code, computed as those codes compute them (protocols.py aggregates them as they do).
FVD, a set-level metric, is in fvd.py."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.video_processor import VideoProcessor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

PSNR_CAP = 100.0  # dB; the PSNR of frames whose MSE is 1e-10 or less
# mae: mean absolute error; ssim_mcvd: scikit-image's SSIM as MCVD's code calls it (frames rounded to {0, 1} as 8-bit
# images, Gaussian weights, population covariances); ssim_openstl: as OpenSTL's code calls it (its defaults: a 7x7
# uniform window, sample covariances, and the data range 2 that scikit-image assumed for float frames when those
# tables were made; it now asks for one); lpips_alex_128: LPIPS-AlexNet on 8-bit frames resized to 128x128 (MCVD).
FIELD_METRICS = ("mae", "ssim_mcvd", "ssim_openstl", "lpips_alex_128")
METRICS = ("mse", "psnr", "ssim", "ssim_binarized", "lpips_alex", "lpips_vgg", *FIELD_METRICS)
MCVD_LPIPS_SIZE = 128
# Digit identity (digit_classifier.py): a per-frame metric that needs the digits' true positions, scored where the
# test set records them. NaN where a frame has no readable digit; averages skip those.
DIGIT_ACC = "digit_acc"
HIGHER_IS_BETTER = {"mse": False, "psnr": True, "ssim": True, "ssim_binarized": True,
                    "lpips_alex": False, "lpips_vgg": False, DIGIT_ACC: True, "mae": False, "ssim_mcvd": True,
                    "ssim_openstl": True, "lpips_alex_128": False}
LPIPS_BACKBONES = {"lpips_alex": ("alex", "alexnet-owt-7be5be79.pth"), "lpips_vgg": ("vgg", "vgg16-397923af.pth"),
                   "lpips_alex_128": ("alex", "alexnet-owt-7be5be79.pth")}


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if prediction.ndim < 4:
        raise ValueError(f"expected frames shaped (..., C, H, W), got {tuple(prediction.shape)}")


def mse_per_frame(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) pairs -> (...) mean squared error of each frame."""
    _check_pair(prediction, target)
    return (prediction.float() - target.float()).pow(2).flatten(-3).mean(-1)


def psnr_per_frame(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _check_pair(prediction, target)
    psnr = peak_signal_noise_ratio(prediction.flatten(0, -4).float(), target.flatten(0, -4).float(), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))
    return psnr.clamp(max=PSNR_CAP).reshape(prediction.shape[:-3])


def ssim_per_frame(prediction: torch.Tensor, target: torch.Tensor, binarize: bool = False) -> torch.Tensor:
    _check_pair(prediction, target)
    frames, goal = prediction.flatten(0, -4).float(), target.flatten(0, -4).float()
    if binarize:
        frames, goal = binarize_frames(frames), binarize_frames(goal)
    ssim = structural_similarity_index_measure(frames, goal, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                               data_range=1.0, reduction="none")
    return ssim.reshape(prediction.shape[:-3])


def mae_per_frame(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) pairs -> (...) mean absolute error of each frame."""
    _check_pair(prediction, target)
    return (prediction.float() - target.float()).abs().flatten(-3).mean(-1)


def to_8bit(frames: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) frames in [0, 1] -> (N, H, W) uint8 grey, as torchvision's ToPILImage and PIL's convert("L") make
    them (x * 255 truncated; RGB weighed by ITU-R 601 luma in PIL's integer arithmetic)."""
    pixels = (frames.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy().astype(np.uint32)
    if pixels.shape[1] == 1:
        return pixels[:, 0].astype(np.uint8)
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def ssim_skimage_per_frame(prediction: torch.Tensor, target: torch.Tensor, protocol: str) -> torch.Tensor:
    """(..., C, H, W) pairs -> (...) SSIM by scikit-image's ``structural_similarity``, called as MCVD's code
    (``protocol="mcvd"``) or OpenSTL's (``"openstl"``) calls it (see ``FIELD_METRICS``)."""
    from skimage.metrics import structural_similarity

    _check_pair(prediction, target)
    frames, goal = prediction.flatten(0, -4).float(), target.flatten(0, -4).float()
    if protocol == "mcvd":  # torch.round: halves go to even, so 0.5 becomes 0, as in MCVD's code
        pairs = zip(to_8bit(frames.round()), to_8bit(goal.round()))
        options = dict(data_range=255, gaussian_weights=True, use_sample_covariance=False)
    elif protocol == "openstl":  # OpenSTL clips its predictions to [0, 1], then passes (W, H, C) float frames
        pairs = zip(frames.clamp(0, 1).cpu().numpy(), goal.cpu().numpy())
        options = dict(data_range=2.0, channel_axis=0)
    else:
        raise ValueError(f"protocol must be 'mcvd' or 'openstl', got {protocol!r}")
    values = [structural_similarity(a, b, **options) for a, b in pairs]
    return torch.tensor(values, dtype=torch.float32).reshape(prediction.shape[:-3])


def binarize_frames(frames: torch.Tensor) -> torch.Tensor:
    """Rounds [0, 1] frames to {0, 1} (0.5 goes to 1)."""
    return (frames >= 0.5).to(frames.dtype)


def load_lpips(name: str, device: torch.device | str = "cpu") -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics' LPIPS ("lpips_alex" or "lpips_vgg") with per-frame output. Its backbone comes from
    torchvision's cache ($TORCH_HOME/hub/checkpoints), downloaded there when absent."""
    if name not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS variant {name!r}; choose one of {sorted(LPIPS_BACKBONES)}")
    net_type, weights = LPIPS_BACKBONES[name]
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="none", normalize=False)
    except Exception as e:  # a download that fails raises URLError, OSError or RuntimeError depending on where
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise FileNotFoundError(
            f"LPIPS ({net_type}) needs torchvision's ImageNet weights {weights} in {cache}, and they could not be "
            f"loaded or downloaded ({type(e).__name__}: {e}). Put the file there, or set TORCH_HOME to a folder "
            f"holding hub/checkpoints/{weights} (TORCH_HOME is {os.environ.get('TORCH_HOME', 'unset')})."
        ) from e
    # channels_last: oneDNN's convolutions skip a layout reorder per layer; LPIPS-VGG 0.62 -> 0.42 s per 10-frame
    # video on 2 threads of an AMD EPYC (Zen 3, no native bf16), the same values to 1e-7 (benchmarks/bench_metrics.py)
    return metric.to(device, memory_format=torch.channels_last).eval()


def lpips_input(frames: torch.Tensor, memory_format=torch.channels_last) -> torch.Tensor:
    """(..., C, H, W) frames in [0, 1] -> (N, 3, H, W) in [-1, 1], grey replicated to RGB, in the layout of the
    network (``load_lpips`` puts it in channels_last)."""
    return VideoProcessor.normalize(frames.flatten(0, -4)).expand(-1, 3, -1, -1).contiguous(memory_format=memory_format)


def mcvd_lpips_input(frames: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) frames in [0, 1] -> (N, 3, 128, 128) in [-1, 1], as MCVD's code feeds LPIPS: 8-bit images
    resized by PIL's bilinear filter (torchvision's Resize on PIL images), in channels_last."""
    images = [PIL.Image.fromarray(frame).convert("RGB").resize((MCVD_LPIPS_SIZE,) * 2, PIL.Image.BILINEAR)
              for frame in to_8bit(frames.flatten(0, -4))]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    return VideoProcessor.normalize(pixels.float() / 255).contiguous(memory_format=torch.channels_last)


class FrameMetrics:
    """Computes every metric of ``METRICS`` per frame; holds the LPIPS networks once loaded."""

    def __init__(self, device: torch.device | str = "cpu", metrics: tuple[str, ...] = METRICS):
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        self.metrics = tuple(metrics)
        self.device = torch.device(device)
        networks = {}  # one network per backbone: lpips_alex and lpips_alex_128 differ only in their inputs
        self.lpips = {name: networks.setdefault(LPIPS_BACKBONES[name][0], load_lpips(name, self.device))
                      for name in self.metrics if name in LPIPS_BACKBONES}

    @torch.no_grad()
    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, F, C, H, W) pairs in [0, 1] -> {metric: (B, F)} on the CPU."""
        _check_pair(prediction, target)
        prediction, target = prediction.to(self.device).float(), target.to(self.device).float()
        scores = {"mse": mse_per_frame, "psnr": psnr_per_frame, "ssim": ssim_per_frame, "mae": mae_per_frame,
                  "ssim_binarized": lambda p, t: ssim_per_frame(p, t, binarize=True),
                  "ssim_mcvd": lambda p, t: ssim_skimage_per_frame(p, t, "mcvd"),
                  "ssim_openstl": lambda p, t: ssim_skimage_per_frame(p, t, "openstl")}
        out = {name: scores[name](prediction, target).cpu() for name in self.metrics if name in scores}
        if self.lpips and prediction.shape[-3] not in (1, 3):
            raise ValueError(f"LPIPS needs 1- or 3-channel frames, got {prediction.shape[-3]}")
        for name, metric in self.lpips.items():
            metric.reset()
            to_input = mcvd_lpips_input if name == "lpips_alex_128" else lpips_input
            metric.update(to_input(prediction), to_input(target))  # torchmetrics checks the [-1, 1] range
            out[name] = metric.compute().reshape(prediction.shape[:-3]).cpu()
        return out


def mean_with_interval(values: torch.Tensor) -> dict[str, float]:
    """Mean over clips and the half-width of its 95% interval (1.96 standard errors; 0 for one clip).
    NaN values (clips without a value) are left out; none left: None for both."""
    values = values.double()
    values = values[~values.isnan()]
    n = values.numel()
    if n == 0:
        return {"mean": None, "ci95": None}
    half = 1.96 * values.std().item() / math.sqrt(n) if n > 1 else 0.0
    return {"mean": values.mean().item(), "ci95": half}


def aggregate(per_frame: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{metric: (N clips, k samples, F frames)} -> per metric: mean-of-k and best-of-k over clips (mean and 95%
    interval), the per-clip values of both, and the per-frame curves (mean over clips and samples). NaN values
    (digit identity's frames without a readable digit) are left out of every mean; a clip or frame with no value
    at all has None (JSON's null)."""
    result = {}
    for name, values in per_frame.items():
        if values.ndim != 3:
            raise ValueError(f"{name}: expected (clips, samples, frames), got {tuple(values.shape)}")
        values, higher = values.double(), HIGHER_IS_BETTER[name]
        mean = torch.nanmean if values.isnan().any() else torch.mean
        with warnings.catch_warnings():  # nanmean of nothing is NaN, which is what is meant
            warnings.simplefilter("ignore")
            per_sample = mean(values, -1)  # over frames: (N, k)
            filled = per_sample.nan_to_num(nan=-math.inf if higher else math.inf)
            best = filled.max(-1).values if higher else filled.min(-1).values
            best[per_sample.isnan().all(-1)] = math.nan
            mean_k, curve = mean(per_sample, -1), mean(values, (0, 1))
        as_list = lambda x: [None if math.isnan(v) else v for v in x.tolist()]  # noqa: E731
        result[name] = {"mean_of_k": mean_with_interval(mean_k), "best_of_k": mean_with_interval(best),
                        "per_clip_mean_of_k": as_list(mean_k), "per_clip_best_of_k": as_list(best),
                        "per_frame": as_list(curve)}
    return result
