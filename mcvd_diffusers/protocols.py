"""The field's evaluation protocols beside ours, computed from the same per-frame scores (metrics.py), so one run
gives all three:

- ``ours``: mean-of-k and best-of-k of each metric, 95% intervals over clips (metrics.aggregate).
- ``mcvd``: MCVD's code (runners/ncsn_runner.py): per video the mean over its frames; per clip the best of its k
  samples for each metric on its own (min MSE, max PSNR = 10 log10(1 / MSE) of a video, max SSIM by scikit-image on
  frames rounded to {0, 1}, min LPIPS-AlexNet at 128 px); the mean over clips, with its 95% interval. FVD on past +
  predicted frames: all k x N samples as one set, and the mean of one FVD per sample trajectory.
- ``openstl``: OpenSTL's units (openstl/core/metrics.py): MSE and MAE summed over a frame's pixels, scikit-image's
  default SSIM and PSNR per frame, each averaged over frames, samples and clips. OpenSTL conditions on 10 frames
  (10 -> 10); our models on 5.
"""

from __future__ import annotations

import math

import torch

from .metrics import mean_with_interval

PROTOCOLS = ("ours", "mcvd", "openstl")
OPENSTL_NOTE = ("OpenSTL's Moving MNIST table predicts 10 frames from 10; these models see 5, so their numbers are "
                "for a harder task than OpenSTL's rows.")


def check_protocols(protocols: list[str]) -> None:
    unknown = [name for name in protocols if name not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols must be one or more of {PROTOCOLS}, got {protocols}")


def mcvd_scores(per_frame: dict[str, torch.Tensor], fvd: dict | None = None) -> dict[str, dict]:
    """{metric: (N clips, k samples, F frames)} -> MCVD's best-of-k numbers {name: {"mean", "ci95"}}; ``fvd``
    ({"all", "per_sample"}, or None) is copied in as ``fvd`` and ``fvd_traj_mean``."""
    video = {name: per_frame[name].double().mean(-1) for name in ("mse", "ssim_mcvd", "lpips_alex_128")}  # (N, k)
    scores = {"mse": mean_with_interval(video["mse"].min(-1).values),
              "psnr": mean_with_interval((10 * torch.log10(1 / video["mse"].clamp(min=1e-10))).max(-1).values),
              "ssim": mean_with_interval(video["ssim_mcvd"].max(-1).values),
              "lpips": mean_with_interval(video["lpips_alex_128"].min(-1).values)}
    if fvd is not None:
        scores["fvd"] = {"mean": fvd["all"], "ci95": None}
        scores["fvd_traj_mean"] = {"mean": fvd["per_sample"], "ci95": None}
    return scores


def openstl_scores(per_frame: dict[str, torch.Tensor], frame_pixels: int) -> dict[str, dict]:
    """{metric: (N, k, F)} -> OpenSTL's numbers, means over every frame of every sample: MSE and MAE summed over
    ``frame_pixels`` (C x H x W) values, SSIM, PSNR (dB, from each frame's MSE; capped as metrics.PSNR_CAP)."""
    def mean(values: torch.Tensor, scale: float = 1.0) -> dict:
        per_clip = values.double().mean((1, 2)) * scale  # every clip weighs the same, as every frame in OpenSTL
        return mean_with_interval(per_clip)

    return {"mse": mean(per_frame["mse"], frame_pixels), "mae": mean(per_frame["mae"], frame_pixels),
            "ssim": mean(per_frame["ssim_openstl"]), "psnr": mean(per_frame["psnr"])}


def protocol_scores(protocols: list[str], per_frame: dict[str, torch.Tensor], frame_pixels: int,
                    fvd: dict | None) -> dict[str, dict]:
    """The rows' numbers under each protocol of ``protocols`` other than ours (which metrics.aggregate gives)."""
    scores = {}
    if "mcvd" in protocols:
        scores["mcvd"] = mcvd_scores(per_frame, fvd)
    if "openstl" in protocols:
        scores["openstl"] = openstl_scores(per_frame, frame_pixels)
    return scores


MCVD_COLUMNS = [("fvd", "FVD", 1), ("fvd_traj_mean", "FVD traj-mean", 1), ("mse", "MSE", 4), ("psnr", "PSNR", 2),
                ("ssim", "SSIM", 3), ("lpips", "LPIPS", 3)]
OPENSTL_COLUMNS = [("mse", "MSE", 2), ("mae", "MAE", 2), ("ssim", "SSIM", 3), ("psnr", "PSNR", 2)]
PROTOCOL_TITLES = {
    "mcvd": "MCVD's protocol: best of k samples per clip and metric (k = {k}; MCVD uses 10), SSIM by scikit-image on "
            "frames rounded to {{0, 1}}, LPIPS-AlexNet at 128 px, FVD on past + predicted frames",
    "openstl": "OpenSTL's units: MSE and MAE summed over each frame's 64x64 pixels, scikit-image's default SSIM, PSNR "
               "per frame; the mean over all k = {k} samples. " + OPENSTL_NOTE}


def format_cell(stats: dict | None, digits: int) -> str:
    if stats is None or stats["mean"] is None or (isinstance(stats["mean"], float) and math.isnan(stats["mean"])):
        return ""
    return f"{stats['mean']:.{digits}f}" + ("" if stats.get("ci95") is None else f" ± {stats['ci95']:.{digits}f}")
