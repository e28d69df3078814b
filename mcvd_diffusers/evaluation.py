"""Evaluation pieces used by eval_mcvd.py: samplers by name, predictions on test clips, GIF grids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.utils import export_to_gif

from .data.moving_mnist import clips_to_video, load_test_set
from .metrics import mse_per_frame
from .pipeline_mcvd import MCVDPipeline
from .schedulers import SAMPLERS, make_sampler


def parse_sampler(spec: str) -> tuple[str, int]:
    """ "ddim:50" -> ("ddim", 50)."""
    name, sep, steps = spec.partition(":")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} in {spec!r}; choose one of {sorted(SAMPLERS)} as NAME:STEPS")
    if not sep or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"sampler {spec!r} needs a step count >= 1, as {name}:50")
    return name, int(steps)


def copy_last_frame(past: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The baseline: the last past frame repeated. (B, P, C, H, W) -> (B, num_frames, C, H, W)."""
    return past[:, -1:].expand(-1, num_frames, *past.shape[2:]).clone()


def predict(pipe: MCVDPipeline, past: torch.Tensor, sampler: str, steps: int, num_frames: int,
            seed: int = 0) -> torch.Tensor:
    """Predictions (B, num_frames, C, H, W) in [0, 1] with a named sampler; one seeded generator per clip."""
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in range(len(past))]
    return pipe(past, num_frames=num_frames, num_inference_steps=steps, generator=generators).frames.cpu()


def _tile(frame: torch.Tensor, scale: int, border: tuple[int, int, int]) -> np.ndarray:
    """A (1, H, W) frame in [0, 1] -> an RGB tile with a 2-pixel colored border."""
    grey = (frame[0].clamp(0, 1) * 255).round().byte().numpy()
    grey = grey.repeat(scale, 0).repeat(scale, 1)
    tile = np.empty((grey.shape[0] + 4, grey.shape[1] + 4, 3), dtype=np.uint8)
    tile[:] = border
    tile[2:-2, 2:-2] = grey[..., None]
    return tile


def comparison_gif(path: str | os.PathLike, past: torch.Tensor, target: torch.Tensor,
                   predictions: dict[str, torch.Tensor], scale: int = 2, fps: int = 4) -> Path:
    """A GIF grid: one row per clip, columns ground truth then each prediction.

    The past frames play first in every column (green border), then the future
    (white border for ground truth, red for predictions)."""
    GREEN, WHITE, RED = (40, 200, 70), (255, 255, 255), (220, 50, 50)
    columns = {"ground truth": target, **predictions}
    frames = []
    for t in range(past.shape[1] + target.shape[1]):
        rows = []
        for b in range(past.shape[0]):
            tiles = []
            for label, video in columns.items():
                if t < past.shape[1]:
                    tiles.append(_tile(past[b, t], scale, GREEN))
                else:
                    tiles.append(_tile(video[b, t - past.shape[1]], scale, WHITE if label == "ground truth" else RED))
            rows.append(np.concatenate(tiles, axis=1))
        grid = np.concatenate(rows, axis=0)
        header = PIL.Image.new("RGB", (grid.shape[1], 14), (0, 0, 0))
        draw = PIL.ImageDraw.Draw(header)
        for i, label in enumerate(columns):
            draw.text((i * (grid.shape[1] // len(columns)) + 3, 1), label, fill=(255, 255, 255))
        draw.text((grid.shape[1] - 28, 1), f"t={t}", fill=(160, 160, 160))
        image = PIL.Image.new("RGB", (grid.shape[1], grid.shape[0] + 14))
        image.paste(header, (0, 0))
        image.paste(PIL.Image.fromarray(grid), (0, 14))
        frames.append(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_gif(frames, str(path), fps=fps)
    return path


def evaluate_samplers(model: str, samplers: list[str], num_clips: int, out: str | os.PathLike,
                      mnist_root: str | None = None, num_frames: int = 10, seed: int = 0,
                      device: str | None = None) -> dict:
    """Predicts the first ``num_clips`` clips of the fixed test set with each sampler; writes a GIF grid
    and ``metrics.json`` (MSE per sampler and for copy-last-frame) into ``out``; returns the metrics."""
    parsed = [parse_sampler(s) for s in samplers]  # all names checked before any work
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    pipe = MCVDPipeline.from_pretrained(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    pipe.set_progress_bar_config(leave=False)
    dataset, test_set = load_test_set(root=mnist_root)
    if num_clips > len(dataset):
        raise ValueError(f"num_clips={num_clips} but the test set holds {len(dataset)} clips")
    num_past = pipe.unet.config.num_past_frames
    if num_frames < 1 or num_past + num_frames > dataset[0]["frames"].shape[0]:
        raise ValueError(f"num_frames must be in 1..{dataset[0]['frames'].shape[0] - num_past} for this test set")
    video = clips_to_video(dataset[:num_clips]["frames"])
    past, future = video[:, :num_past], video[:, num_past : num_past + num_frames]
    predictions = {"copy last frame": copy_last_frame(past, future.shape[1])}
    for name, steps in parsed:
        predictions[f"{name}:{steps}"] = predict(pipe, past, name, steps, future.shape[1], seed)
    results = {
        label: {"mse": mse_per_frame(pred, future).mean().item()} for label, pred in predictions.items()
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gif = comparison_gif(out / "predictions.gif", past[:4], future[:4],
                         {k: v[:4] for k, v in predictions.items() if k != "copy last frame"})
    record = {"model": str(model), "num_clips": num_clips, "test_set": test_set, "device": device,
              "results": results, "gif": gif.name}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    return record
