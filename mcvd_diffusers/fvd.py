"""Fréchet Video Distance (Unterthiner et al., 2018) between the I3D features of real and generated videos.

Protocol: frames in [0, 1] (grey replicated to RGB) resized to 224 px by bilinear ``F.interpolate``
(half-pixel centres, no antialiasing, as VideoGPT's PyTorch FVD which MCVD uses; non-square frames are
stretched, not centre-cropped, and stay floats where VideoGPT rounds to 8 bits), scaled to [-1, 1]; features:
I3D's 400 logits averaged over time; float64 mean and unbiased covariance per set. FVD is biased upward for
small sets (rank <= N - 1 of 400): compare values only at equal N, k and pooling. ``resize_to`` != 224 or fewer
than 9 frames give values not comparable with published FVDs (for tests and quick checks).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.video_processor import VideoProcessor

from .models.i3d import MIN_FRAMES, STANDARD_SIZE, I3D, load_i3d

POOLINGS = ("all", "per_sample")
ArrayLike = torch.Tensor | np.ndarray


def _as_float64(name: str, value: ArrayLike, ndim: int) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition. Eigenvalues below the rounding floor (numpy's
    matrix_rank tolerance) are set to 0: in a singular covariance (fewer videos than features) their square roots,
    ~1e-8, would add up over hundreds of null directions."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    floor = eigenvalues.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    roots = torch.where(eigenvalues > floor, eigenvalues, 0).sqrt()
    return (eigenvectors * roots) @ eigenvectors.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64: |mu1 - mu2|^2 + tr(S1) + tr(S2)
    - 2 tr((S1 S2)^(1/2)), clipped at 0.

    With R = S^(1/2), S1 S2 has the eigenvalues of (R2 R1)^T (R2 R1), so the cross term is the sum of the singular
    values of R2 R1: round-off stays ~1e-16 relative, where scipy.linalg.sqrtm(S1 @ S2) (the usual FID code) is off
    by ~1e-7 on singular covariances (tests/test_fvd.py)."""
    mu1, mu2 = _as_float64("mu1", mu1, 1), _as_float64("mu2", mu2, 1)
    sigma1, sigma2 = _as_float64("sigma1", sigma1, 2), _as_float64("sigma2", sigma2, 2)
    dim = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}; with mu1 of {dim} features it must be {shape}")
    cross = torch.linalg.svdvals(_sqrt_psd(sigma2) @ _sqrt_psd(sigma1)).sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(distance.item(), 0.0)


def feature_statistics(features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> their mean (D,) and unbiased covariance (D, D), in float64."""
    features = _as_float64("features", features, 2)
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}")
    return features.mean(0), torch.cov(features.T)


def _check_videos(name: str, videos: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(videos, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor shaped {layout}, got {type(videos).__name__}")
    if videos.ndim != ndim:
        raise ValueError(f"{name} must be shaped {layout}, got {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise ValueError(f"{name} must hold floats in [0, 1], got dtype {videos.dtype} (divide 8-bit frames by 255)")
    if videos.shape[-3] not in (1, 3):
        raise ValueError(f"{name} must have 1 (grey) or 3 (RGB) channels, got {videos.shape[-3]} in "
                         f"{tuple(videos.shape)} shaped {layout}")
    if videos.numel() == 0:
        raise ValueError(f"{name} is empty: {tuple(videos.shape)}")
    if not torch.isfinite(videos).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = videos.min().item(), videos.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"{name} must be in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                         "(rescale [-1, 1] or 0-255 frames first)")


def i3d_inputs(videos: torch.Tensor, resize_to: int = STANDARD_SIZE) -> torch.Tensor:
    """(B, T, C, H, W) frames in [0, 1], C = 1 or 3 -> I3D's input (B, 3, T, resize_to, resize_to) in [-1, 1]."""
    batch, frames = videos.shape[:2]
    x = videos.flatten(0, 1).float()
    if tuple(x.shape[-2:]) != (resize_to, resize_to):
        x = F.interpolate(x, size=(resize_to, resize_to), mode="bilinear", align_corners=False, antialias=False)
    x = VideoProcessor.normalize(x.expand(-1, 3, -1, -1))  # grey -> RGB (no-op for 3 channels), then [-1, 1]
    return x.reshape(batch, frames, 3, resize_to, resize_to).transpose(1, 2)


@torch.no_grad()
def i3d_features(videos: torch.Tensor, i3d: I3D, *, batch_size: int = 8,
                 resize_to: int = STANDARD_SIZE) -> torch.Tensor:
    """(N, T, C, H, W) frames in [0, 1] -> (N, 400) I3D logits in float64 on the CPU."""
    _check_videos("videos", videos, 5, "(N, T, C, H, W)")
    if batch_size < 1 or resize_to < 1:
        raise ValueError(f"batch_size and resize_to must be positive, got {batch_size} and {resize_to}")
    if videos.shape[1] < MIN_FRAMES:
        warnings.warn(f"{videos.shape[1]} frames per video: I3D's standard head needs {MIN_FRAMES} or more, so these "
                      "features (and FVDs) are not comparable with published ones", stacklevel=2)
    i3d.eval()  # batch norm must use its running statistics: a feature may not depend on the batch
    device = next(i3d.parameters()).device
    # channels_last_3d: oneDNN's convolutions skip a layout reorder per layer, the same features to float rounding;
    # bf16, faster still, moves features by more than the 1e-3 FVD can bear (benchmarks/RESULTS.md, "FVD's cost")
    i3d.to(memory_format=torch.channels_last_3d)
    features = [i3d(i3d_inputs(videos[i:i + batch_size].to(device), resize_to)
                    .contiguous(memory_format=torch.channels_last_3d)).double().cpu()
                for i in range(0, videos.shape[0], batch_size)]
    return torch.cat(features)


def _check_fvd_inputs(predictions: torch.Tensor, targets: torch.Tensor, past: torch.Tensor | None,
                      include_past: bool, pooling: str) -> None:
    _check_videos("predictions", predictions, 6, "(N clips, k samples, T, C, H, W)")
    _check_videos("targets", targets, 5, "(N clips, T, C, H, W)")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    n, k, frames, *frame = predictions.shape
    if targets.shape[0] != n:
        raise ValueError(f"predictions hold {n} clips and targets {targets.shape[0]}; both need one entry per clip")
    if targets.shape[1] != frames:
        raise ValueError(f"frame-count mismatch: predictions have {frames} frames per video, targets "
                         f"{targets.shape[1]}; FVD compares videos of equal length")
    if list(targets.shape[2:]) != frame:
        raise ValueError(f"predictions' frames are {tuple(frame)} (C, H, W) but targets' are "
                         f"{tuple(targets.shape[2:])}")
    if n < 2:
        raise ValueError(f"FVD needs at least 2 clips (a covariance of features), got {n}; use hundreds for a "
                         "meaningful value")
    if include_past and past is None:
        raise ValueError("include_past=True needs the conditioning frames: pass past shaped (N, P, C, H, W)")
    if past is not None:
        _check_videos("past", past, 5, "(N clips, P, C, H, W)")
        if past.shape[0] != n or list(past.shape[2:]) != frame:
            raise ValueError(f"past {tuple(past.shape)} must be shaped (N={n}, P, *{tuple(frame)}) to match "
                             "predictions")


def fvd(predictions: torch.Tensor, targets: torch.Tensor, past: torch.Tensor | None = None, *,
        include_past: bool = False, pooling: str = "all", i3d: I3D | None = None, batch_size: int = 8,
        resize_to: int = STANDARD_SIZE) -> float:
    """FVD between predictions (N, k, T, C, H, W), k samples for each of N clips, and the real continuations
    targets (N, T, C, H, W), all in [0, 1]. ``include_past`` prepends past (N, P, C, H, W), the conditioning
    frames, to both sets (MCVD reports FVD on past + predicted frames).

    pooling: "all" fits one Gaussian to all N * k generated videos (less small-sample bias, lower values);
    "per_sample" averages the k FVDs of the j-th samples against the real videos. Equal for k = 1.
    i3d: None loads ``load_i3d()`` on predictions' device; batch_size: videos per I3D call."""
    _check_fvd_inputs(predictions, targets, past, include_past, pooling)
    n, k = predictions.shape[:2]
    if include_past:  # the same conditioning frames open every sample of a clip and its real continuation
        targets = torch.cat([past.to(targets), targets], dim=1)
        predictions = torch.cat([past.to(predictions).unsqueeze(1).expand(-1, k, -1, -1, -1, -1), predictions], dim=2)
    if i3d is None:
        i3d = load_i3d(device=predictions.device)
    options = dict(batch_size=batch_size, resize_to=resize_to)
    real = i3d_features(targets, i3d, **options)
    generated = i3d_features(predictions.flatten(0, 1), i3d, **options).reshape(n, k, -1)
    return fvd_from_features(generated, real, pooling)


def fvd_from_features(generated: ArrayLike, real: ArrayLike, pooling: str = "all") -> float:
    """FVD from I3D features already computed: generated (N, k, D), real (M, D); ``pooling`` as in ``fvd``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    generated = torch.as_tensor(generated)
    if generated.ndim != 3:
        raise ValueError(f"generated features must be shaped (N, k, D), got {tuple(generated.shape)}")
    real = feature_statistics(real)
    if pooling == "all":
        return frechet_distance(*feature_statistics(generated.flatten(0, 1)), *real)
    return float(np.mean([frechet_distance(*feature_statistics(generated[:, j]), *real)
                          for j in range(generated.shape[1])]))
