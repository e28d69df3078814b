"""Helpers shared by the benchmark scripts: timing with synchronization, the device's matmul rate,
tables and JSON. Run the scripts from the repository root: python benchmarks/bench_*.py"""

from __future__ import annotations

import json
import resource
import statistics
import time

import torch

from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.pipeline_mcvd import MCVDPipeline
from mcvd_diffusers.runtime import cpu_has_native_bf16, cpu_model_name, device_name, machine_state, synchronize, versions
from mcvd_diffusers.schedulers import SamplerSpec
from mcvd_diffusers.validation import PREDICTED_FRAMES


MACHINE_AT_START: dict | None = None  # set by apply_threads


def pick_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    return device


def median_seconds(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(device: torch.device, dtype=torch.bfloat16, size: int | None = None, repeats: int = 5) -> float:
    """The device's dense matmul rate, measured now with a large square matmul (TFLOP/s)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats, warmup=2)
    return 2 * size**3 / seconds / 1e12


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def digits_on(device: torch.device) -> torch.Tensor:
    """Digits for generated clips: the bundled MNIST sample (speed does not depend on which digits)."""
    return load_mnist("train", root="bundled").images.to(device)


def environment(device: torch.device) -> dict:
    """The device, the CPU (its model, and whether it runs bf16 natively: elsewhere bf16 is emulated, far slower than
    fp32) and the versions."""
    return {"device": device_name(device), "cpu": cpu_model_name(), "cpu_native_bf16": cpu_has_native_bf16(),
            "machine_at_start": MACHINE_AT_START, "versions": versions()}


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads torch uses (default: torch's, one per core); with other work on the machine, "
                             "fewer threads than cores keep OpenMP threads from waiting on each other")


def apply_threads(parser, args) -> None:
    """Sets --threads, then records the machine as the benchmark starts (CPU, threads, load average)."""
    global MACHINE_AT_START
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    MACHINE_AT_START = machine_state()
    print(f"machine: {MACHINE_AT_START['cpu']}, {MACHINE_AT_START['threads']} threads, load average "
          f"{MACHINE_AT_START['load_average'][0]:.2f}", flush=True)


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Prints rows as an aligned table; ``columns`` are (key, title)."""
    cells = [[title for _, title in columns]] + [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


@torch.no_grad()
def score(unet, scheduler, clips: torch.Tensor, sampler: SamplerSpec | str, frame_metrics, samples: int = 1,
          digits=None) -> dict:
    """Mean metrics of ``samples`` predictions per clip (seeded per clip and sample) of the ``PREDICTED_FRAMES``
    frames after each clip's past, rolled out block by block, with a named sampler built from ``scheduler``'s
    config; SSIM also at predicted frames 1, 5 and 10 (``ssim_f1``, ``ssim_f5``, ``ssim_f10``). Given
    ``digits`` (a ``DigitIdentity`` of the clips' predicted frames), also digit identity (``digit_acc``, and
    ``digit_f10`` at frame 10)."""
    sampler = SamplerSpec.parse(sampler)
    steps = sampler.steps
    pipe = MCVDPipeline(unet=unet, scheduler=sampler.build(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    past, target = split_past_target(unet, clips)
    totals = {}
    for s in range(samples):
        generators = [torch.Generator().manual_seed(i + (s << 20)) for i in range(len(clips))]
        video = pipe(past, num_frames=target.shape[1], num_inference_steps=steps, generator=generators).frames
        for k, v in metrics_in_chunks(frame_metrics, video, target).items():
            totals[k] = totals.get(k, 0.0) + v.mean().item() / samples
            if k == "ssim":
                for frame in (1, 5, 10):
                    totals[f"ssim_f{frame}"] = totals.get(f"ssim_f{frame}", 0.0) + v[:, frame - 1].mean().item() / samples
        for k, v in ({} if digits is None else digit_scores(digits, video)).items():
            totals[k] = totals.get(k, 0.0) + v / samples
    return totals


def metrics_in_chunks(frame_metrics, video: torch.Tensor, target: torch.Tensor, chunk: int = 64) -> dict:
    """``frame_metrics(video, target)``, ``chunk`` clips at a time: LPIPS-VGG on every frame of 256 clips at once
    needs over 20 GiB."""
    parts = [frame_metrics(video[i : i + chunk], target[i : i + chunk]) for i in range(0, len(video), chunk)]
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def digit_scores(digits, video: torch.Tensor) -> dict:
    """Digit identity of predictions of every clip: the mean over readable digits' frames, and at frame 10."""
    accuracy = digits(video, slice(None))  # (N, F), NaN where no digit is readable
    return {"digit_acc": accuracy.nanmean().item(), "digit_f10": accuracy[:, PREDICTED_FRAMES - 1].nanmean().item()}


def split_past_target(unet, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation clips -> the model's past frames and the ``PREDICTED_FRAMES`` after them (the task)."""
    num_past = unet.config.num_past_frames
    if clips.shape[1] < num_past + PREDICTED_FRAMES:
        raise ValueError(f"clips of {clips.shape[1]} frames cannot hold {num_past} past + {PREDICTED_FRAMES} frames")
    return clips[:, :num_past], clips[:, num_past : num_past + PREDICTED_FRAMES]
