"""Unconditional generation, measured without a ground truth (``eval_mcvd.py --task generate``): each sampler draws
``num_clips`` videos with no frames in, scored beside the first ``num_clips`` real test clips and noise (Gaussian
noise on [-1, 1], clipped: an untrained model's output), a ceiling and a floor for each score:

- ``confident``: the share of digit windows (``digit_windows``) the digit classifier reads with a top probability
  >= ``CONFIDENT``; it has no "no digit" answer and reads noise confidently, so a window whose mean ink is outside
  ``INK_RANGE`` (what real clips' digit windows hold) counts as not confident. ``confidence``: the mean top
  probability (0 outside the ink range).
- ``identity_kept``: per video, the share of frame 1's confidently read digits read as the same in later frames.
- ``label_entropy``: the entropy (bits) of the confident labels over the set: log2 10 when every digit is drawn
  alike, 0 when one digit is drawn every time.
- ``pairwise_mse``: the mean per-pixel MSE between videos i and i+1 of the set: 0 when every video is the same.
- ``fvd`` against the real clips, with ``--fvd``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F
from diffusers.utils import export_to_gif
from tqdm.auto import tqdm

from .data.moving_mnist import clips_to_video
from .digit_classifier import DIGIT_SIZE, MAX_OVERLAP, crop_windows, load_digit_classifier, weights_sha256
from .evaluation import (EvalConfig, _sample, _time_batch1, _video_generators, load_fvd_network, load_test_clips,
                         start)
from .fvd import fvd_from_features, i3d_features
from .metrics import mse_per_frame
from .report import (TIMING_HEADER, _tile, clear_outputs, device_text, make_record, markdown_table,
                     record_task_evaluation, row_cells, write_metrics_json)
from .runtime import device_name
from .schedulers import SamplerSpec

CONFIDENT = 0.9  # top softmax probability of a confident read
# The mean ink of a window that holds a digit: the 0.1th and 99.9th percentiles (0.055, 0.419) of the windows
# this locator finds in 256 clips of MNIST validation digits (noise holds ~0.51, a blank frame 0).
INK_RANGE = (0.05, 0.42)
LOCATOR_SIGMA = 7.0  # pixels: the Gaussian weight that centres each window on its digit
REAL, NOISE = "real test clips", "noise"
SCORES = ("confident", "confidence", "identity_kept", "label_entropy", "pairwise_mse")
LABEL_WIDTH = 80  # pixels of the GIF's row labels


def digit_windows(frames: torch.Tensor, num_digits: int) -> torch.Tensor:
    """(B, F, 1, H, W) frames in [0, 1] -> (B, F, num_digits, 2) top-left (row, col) of the 28x28 windows with the
    most ink under a centred Gaussian weight (a digit lands mid-window, as MNIST centres it), greedily, each
    overlapping the ones chosen before it by at most MAX_OVERLAP of its area."""
    B, T = frames.shape[:2]
    weight = torch.exp(-(torch.arange(DIGIT_SIZE) - (DIGIT_SIZE - 1) / 2) ** 2 / (2 * LOCATOR_SIGMA**2))
    weight = (weight[:, None] * weight[None])[None, None].to(frames.device)
    ink = F.conv2d(frames.flatten(0, 1).float(), weight / weight.sum())[:, 0]  # (B*F, H-27, W-27)
    rows, cols = torch.meshgrid(torch.arange(ink.shape[1]), torch.arange(ink.shape[2]), indexing="ij")
    chosen = []
    for _ in range(num_digits):
        flat = ink.flatten(1).argmax(1)
        r, c = flat // ink.shape[2], flat % ink.shape[2]
        chosen.append(torch.stack([r, c], -1))
        overlap = ((DIGIT_SIZE - (rows - r[:, None, None]).abs()).clamp(min=0)
                   * (DIGIT_SIZE - (cols - c[:, None, None]).abs()).clamp(min=0))
        ink = ink.masked_fill(overlap > MAX_OVERLAP * DIGIT_SIZE**2, -1.0)
    return torch.stack(chosen, 1).view(B, T, num_digits, 2)


@torch.no_grad()
def read_digits(classifier, frames: torch.Tensor, num_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, F, 1, H, W) -> labels and top probabilities (B, F, num_digits) of each frame's digit windows;
    probability 0 for a window whose ink is outside INK_RANGE."""
    frames = frames.float().clamp(0, 1)
    windows = crop_windows(frames[:, :, 0], digit_windows(frames, num_digits))  # (B, F, D, 28, 28)
    device = next(classifier.parameters()).device
    probs = classifier(windows.reshape(-1, 1, DIGIT_SIZE, DIGIT_SIZE).to(device)).softmax(-1).cpu()
    top, labels = probs.max(-1)
    ink = windows.flatten(-2).mean(-1).reshape(-1).cpu()
    digit_like = (ink >= INK_RANGE[0]) & (ink <= INK_RANGE[1])
    return labels.view(windows.shape[:3]), torch.where(digit_like, top, torch.zeros_like(top)).view(windows.shape[:3])


def generation_scores(labels: torch.Tensor, top: torch.Tensor, videos: torch.Tensor) -> dict:
    """The set's scores (module docstring) from ``read_digits``' labels and probabilities and the videos."""
    confident = top >= CONFIDENT  # (B, F, D)
    first = [set(labels[b, 0][confident[b, 0]].tolist()) for b in range(len(labels))]
    kept = [np.mean([len(first[b] & set(labels[b, t].tolist())) / len(first[b]) for t in range(1, labels.shape[1])])
            for b in range(len(labels)) if first[b] and labels.shape[1] > 1]
    counts = torch.bincount(labels[confident], minlength=10).double()
    p = counts[counts > 0] / counts.sum() if counts.sum() > 0 else counts[:0]
    return {"confident": confident.float().mean().item(), "confidence": top.mean().item(),
            "identity_kept": float(np.mean(kept)) if kept else None,
            "label_entropy": float(-(p * p.log2()).sum()) if len(p) else 0.0,
            "pairwise_mse": mse_per_frame(videos, videos.roll(1, dims=0)).mean().item() if len(videos) > 1 else None,
            "confident_per_frame": confident.float().mean((0, 2)).tolist()}


def evaluate_generation(config: EvalConfig, requested: list[SamplerSpec | None]) -> dict:
    """--task generate: draws, scores and writes (metrics.json, summary.md, curves.png, generated.gif)."""
    setup = start(config, requested)  # machine, device, precision, pipeline, samplers; checks the task
    config, pipe, device = setup.config, setup.pipe, setup.device
    tqdm.write(f"generation: {config.num_clips} videos of {config.num_frames} frames per sampler, beside "
               f"{config.num_clips} real test clips and noise (samples_per_clip does not apply)")
    clips, test_info = load_test_clips(config)
    if config.num_frames > clips.shape[1]:
        raise ValueError(f"the test clips hold {clips.shape[1]} frames, fewer than num_frames={config.num_frames}")
    i3d, fvd_weights = load_fvd_network(config, device)
    classifier = load_digit_classifier(device=device)
    num_digits = int(test_info.get("num_digits", 2))
    real = clips_to_video(clips)[:, : config.num_frames]
    noise = ((torch.randn(real.shape, generator=torch.Generator().manual_seed(config.seed)) + 1) / 2).clamp(0, 1)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)

    sets, rows = {REAL: real, NOISE: noise}, {}
    with tqdm(total=len(setup.samplers) * config.num_clips, desc="generate", unit="video") as progress:
        for sampler in setup.samplers:
            progress.set_postfix(sampler=str(sampler))
            sets[str(sampler)], rows[str(sampler)] = generate_videos(setup, sampler, progress)
    real_features = None
    for label, videos in tqdm(sets.items(), desc="score", unit="set"):
        row = rows.setdefault(label, {"kind": "reference", "timing": {}})
        row["scores"] = generation_scores(*read_digits(classifier, videos, num_digits), videos)
        if i3d is not None:
            features = i3d_features(videos, i3d, batch_size=config.batch_size, resize_to=config.fvd_size)[:, None]
            real_features = features[:, 0] if label == REAL else real_features
            row["scores"]["fvd"] = fvd_from_features(features, real_features, "all")  # one sample per video
    fvd = None if i3d is None else {"weights": fvd_weights, "frame_size": config.fvd_size}
    record = {"task": "generate", **make_record(
        setup.asked, dict(pipe.unet.config), test_info, device_name(device), setup.shipped, fvd, rows,
        machine=setup.machine, precision=setup.precision, num_digits=num_digits, confident_probability=CONFIDENT,
        ink_range=INK_RANGE, classifier=f"sha256:{weights_sha256()}")}
    _write_generation_outputs(out, record, sets, config.gif_clips)
    if config.update_model_card:
        record_task_evaluation(Path(config.model), "generate", record, generation_table(record))
    return record


def generate_videos(setup, sampler: SamplerSpec, progress) -> tuple[torch.Tensor, dict]:
    """``num_clips`` videos drawn with ``sampler`` (one seeded generator each, in batches) and their row
    (steps, amortized time, and the batch-1 latency with ``timing``)."""
    config, pipe = setup.config, setup.pipe
    pipe.scheduler = sampler.build(setup.trained_scheduler_config)
    videos, seconds, n = [], 0.0, config.num_clips
    for start_index in range(0, n, config.batch_size):
        index = torch.arange(start_index, min(start_index + config.batch_size, n))
        frames, batch_seconds = _sample(pipe, config, sampler.steps, generator=_video_generators(
            pipe.device, config.seed, index, torch.zeros_like(index)), batch_size=len(index))
        videos.append(frames.cpu().float())
        seconds += batch_seconds
        progress.update(len(index))
    row = {"kind": "sampler", "steps": sampler.steps,
           "timing": {"seconds_per_video_amortized": seconds / n, "batch_size": config.batch_size}}
    if config.timing:
        row["timing"].update(_time_batch1(pipe, config, sampler.steps))
    return torch.cat(videos), row


def generation_table(record: dict) -> str:
    with_fvd = record.get("fvd") is not None
    lines = [[*row_cells(record, label, row),
              *["n/a" if row["scores"][name] is None else f"{row['scores'][name]:.3f}" for name in SCORES],
              *([f"{row['scores']['fvd']:.1f}"] if with_fvd else [])] for label, row in record["rows"].items()]
    return markdown_table([*TIMING_HEADER, "confident digit", "confidence", "identity kept", "label entropy (bits)",
                           "pairwise MSE", *(["FVD"] if with_fvd else [])], lines)


def _write_generation_outputs(out: Path, record: dict, sets: dict, gif_videos: int) -> None:
    """summary.md (what was drawn and compared, the table, the machine the times come from), curves.png,
    generated.gif (a row per set but noise, named on the left) and metrics.json."""
    from matplotlib.figure import Figure

    (out / "summary.md").write_text(
        f"# Unconditional generation of {record['model']}\n\n{record['eval_config']['num_clips']} videos of "
        f"{record['eval_config']['num_frames']} frames per row, no frames in; real test clips ({record['data_source']})"
        f" and noise for reference. Digit windows: the {record['num_digits']} windows of most ink per frame, read by "
        f"the digit classifier; confident: top probability >= {record['confident_probability']}, in windows whose "
        f"mean ink is in {list(record['ink_range'])}. Device {device_text(record)}, load average "
        f"{record['machine']['load_average'][0]:.2f} at the start; batch 1 is the median of 5 calls after a warm-up."
        f"\n\n{generation_table(record)}\n")
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for label, row in record["rows"].items():
        curve = row["scores"]["confident_per_frame"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label,
                linestyle="--" if row["kind"] == "reference" else "-")
    ax.set_xlabel("generated frame")
    ax.set_title("digit windows read confidently", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    if gif_videos > 0:
        shown = {label: videos[:gif_videos] for label, videos in sets.items() if label != NOISE}
        border, frames = {label: (255, 255, 255) if label == REAL else (220, 50, 50) for label in shown}, []
        for t in range(record["eval_config"]["num_frames"]):
            grid = np.concatenate([np.concatenate([_tile(video[t], 2, border[label]) for video in videos], axis=1)
                                   for label, videos in shown.items()])
            image = PIL.Image.new("RGB", (grid.shape[1] + LABEL_WIDTH, grid.shape[0] + 16))
            draw = PIL.ImageDraw.Draw(image)
            for i, label in enumerate(shown):
                text = "real clips" if label == REAL else label
                draw.text((3, 16 + i * grid.shape[0] // len(shown) + 4), text, fill=(255, 255, 255))
            draw.text((LABEL_WIDTH + 3, 2), f"frame {t + 1}", fill=(160, 160, 160))
            image.paste(PIL.Image.fromarray(grid), (LABEL_WIDTH, 16))
            frames.append(image)
        export_to_gif(frames, str(out / "generated.gif"), fps=4)
    write_metrics_json(out, record)
