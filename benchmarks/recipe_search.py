"""Which training recipe learns video prediction fastest per CPU-minute? Candidates at equal CPU time.

usage: python benchmarks/recipe_search.py [--minutes 5] [--threads 1] [--parallel 2] [--candidates NAME ...]
           [--mnist-root DIR] [--val-clips 32] [--sampler ddim:20] [--out-dir results/recipe_search]
           [--out FILE.json] [--curves FILE.png]

Each candidate is a set of training-config keys (``TrainConfig``) over a common base. It trains in
its own process on ``--threads`` threads for ``--minutes`` of training CPU time (the process's CPU
time, so that candidates running side by side get equal compute; evaluation is not counted),
drawing fresh clips from MNIST train digits as train_mcvd.py does, with AdamW, a 100-step warm-up
then a constant LR, and EMA weights. At 1/4, 1/2, 3/4 and all of the budget the EMA weights
predict the same ``--val-clips`` clips of MNIST *validation* digits (never the test clips) with a
few-step sampler; MSE, raw and binarized SSIM and LPIPS-alex are scored next to copy-last-frame.
``--parallel`` candidates run at once (give each its own core: --threads 1 --parallel 2 on 2 cores).
A candidate whose result is already in ``--out-dir`` is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import environment, print_table, score, write_json
from diffusers.training_utils import EMAModel

from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.evaluation import copy_last_frame
from mcvd_diffusers.metrics import FrameMetrics
from mcvd_diffusers.runtime import autocast
from mcvd_diffusers.schedulers import SamplerSpec, make_noise_scheduler
from mcvd_diffusers.config import TrainConfig, build_unet
from mcvd_diffusers.losses import diffusion_loss
from mcvd_diffusers.validation import ValidationSet

# What every candidate shares unless it says otherwise: the cpu preset's widths at patch 2, x0 prediction.
BASE = dict(preset="cpu", patch_size=2, prediction_type="sample", batch_size=16, learning_rate=1e-3, mixed_precision="bf16",
            beta_schedule="cosine", noise_shift=1.0, min_snr_gamma=None, ema_decay=0.999)
CANDIDATES: dict[str, dict] = {
    "tiny-v": dict(preset="tiny", prediction_type="v_prediction"),  # the quickstart's recipe
    "p2-v": dict(prediction_type="v_prediction"),
    "p2-eps": dict(prediction_type="epsilon"),
    "p2-x0": dict(),
    "p1-x0": dict(patch_size=1),
    "p4-x0": dict(patch_size=4),
    "p2-x0-wide": dict(block_out_channels=[96, 192, 192]),
    "p4-x0-wide": dict(patch_size=4, block_out_channels=[128, 256, 256]),
    "p2-x0-lr3e-4": dict(learning_rate=3e-4),
    "p2-x0-lr3e-3": dict(learning_rate=3e-3),
    "p2-x0-b64": dict(batch_size=64),
    "p4-x0-b64": dict(patch_size=4, batch_size=64),  # the two that lowered MSE most, together
    "p2-x0-fp32": dict(mixed_precision="no"),
    "p2-x0-shift2": dict(noise_shift=2.0),
    "p2-x0-minsnr5": dict(min_snr_gamma=5.0),
}
METRICS = ("mse", "ssim", "ssim_binarized", "lpips_alex")
WARMUP_STEPS = 100


def candidate_config(name: str, mnist_root: str | None, val_clips: int) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **CANDIDATES[name], "mnist_root": mnist_root, "val_clips": val_clips,
                                  "sample_clips": 1, "lr_scheduler": "constant_with_warmup",
                                  "warmup_steps": WARMUP_STEPS})


def run_candidate(name: str, args) -> dict:
    """Trains one candidate for the time budget; returns its learning curve and final scores."""
    torch.set_num_threads(args.threads)
    config = candidate_config(name, args.mnist_root, args.val_clips)
    torch.manual_seed(config.seed)
    unet = build_unet(config).train()
    scheduler = make_noise_scheduler(config.beta_schedule, config.prediction_type, config.num_train_timesteps,
                                     config.noise_shift)
    data = MovingMNIST(load_mnist("train", root=config.mnist_root).images, image_size=config.image_size,
                       num_frames=unet.clip_length)
    clips = ValidationSet(load_mnist("val", root=config.mnist_root), unet, config).clips
    frame_metrics = FrameMetrics(metrics=METRICS)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    precision = {"no": "fp32"}.get(config.mixed_precision, config.mixed_precision)
    generator = torch.Generator().manual_seed(config.seed)
    budget = args.minutes * 60
    checkpoints = [budget * f for f in (0.25, 0.5, 0.75, 1.0)]
    curve, step, trained, losses = [], 0, 0.0, []
    while checkpoints:
        start = time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * min(1.0, (step + 1) / WARMUP_STEPS)
        with autocast(precision, "cpu"):
            loss = diffusion_loss(unet, scheduler, data.sample(config.batch_size, generator), generator,
                                  config.min_snr_gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        step += 1
        losses.append(loss.item())
        trained += time.process_time() - start
        if trained >= checkpoints[0]:
            checkpoints.pop(0)
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            with autocast(precision, "cpu"):
                scores = score(unet, scheduler, clips, args.sampler, frame_metrics)
            ema.restore(unet.parameters())
            unet.train()
            curve.append({"minutes": trained / 60, "step": step, "train_loss": sum(losses[-100:]) / len(losses[-100:]),
                          **scores})
            print(f"{name}: {trained / 60:.1f} min, step {step}, " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                  flush=True)
    return {"name": name, "overrides": CANDIDATES[name], "config": config.to_dict(),
            "parameters": sum(p.numel() for p in unet.parameters()), "steps": step,
            "samples_per_second": step * config.batch_size / trained, "curve": curve, **curve[-1]}


def copy_last_scores(args) -> dict:
    config = candidate_config("p2-x0", args.mnist_root, args.val_clips)
    unet = build_unet(config)
    past, current, _ = unet.split_clip(ValidationSet(load_mnist("val", root=config.mnist_root), unet, config).clips)
    values = FrameMetrics(metrics=METRICS)(copy_last_frame(past, current.shape[1]), current)
    return {"name": "copy-last", **{k: v.mean().item() for k, v in values.items()}}


def plot(path: Path, results: list[dict], baseline: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("ssim", "SSIM (raw)"), ("ssim_binarized", "SSIM (binarized)"), ("mse", "MSE (log scale)"),
              ("lpips_alex", "LPIPS (AlexNet)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.5))
    colors = plt.get_cmap("tab20").colors
    for ax, (metric, title) in zip(axes, panels):
        for i, r in enumerate(results):
            ax.plot([p["minutes"] for p in r["curve"]], [p[metric] for p in r["curve"]], marker="o",
                    color=colors[i % len(colors)], linestyle="-" if i < len(colors) else "--", label=r["name"])
        ax.axhline(baseline[metric], color="k", linestyle=":", label="copy-last")
        ax.set_xlabel("training CPU minutes (1 thread each)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--minutes", type=float, default=5.0, help="training minutes per candidate")
    parser.add_argument("--threads", type=int, default=1, help="threads per candidate")
    parser.add_argument("--parallel", type=int, default=2, help="candidates trained at once")
    parser.add_argument("--mnist-root", default=None)
    parser.add_argument("--val-clips", type=int, default=32)
    parser.add_argument("--sampler", default="ddim:20")
    parser.add_argument("--out-dir", default="results/recipe_search", help="one JSON per candidate")
    parser.add_argument("--out", default=None, help="the whole table as JSON")
    parser.add_argument("--curves", default=None, help="learning curves as PNG")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minutes <= 0 or args.threads < 1 or args.parallel < 1 or args.val_clips < 1:
        parser.error("--minutes must be > 0, --threads, --parallel and --val-clips >= 1")
    try:
        SamplerSpec.parse(args.sampler)
    except ValueError as e:
        parser.error(str(e))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = run_candidate(args.worker, args)
        (out_dir / f"{args.worker}.json").write_text(json.dumps(result, indent=2))
        return

    todo = [name for name in args.candidates if not (out_dir / f"{name}.json").exists()]
    running: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name in todo:
        while sum(p.poll() is None for p in running) >= args.parallel:
            time.sleep(2)
        command = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        running.append(subprocess.Popen(command, env=env))
    failed = [name for name, p in zip(todo, running) if p.wait() != 0]
    if failed:
        sys.exit(f"error: candidates {failed} failed (their errors are above); the others are in {out_dir}")
    results = [json.loads((out_dir / f"{name}.json").read_text()) for name in args.candidates
               if (out_dir / f"{name}.json").exists()]
    torch.set_num_threads(args.threads)
    baseline = copy_last_scores(args)
    columns = [("name", "candidate"), ("parameters", "params"), ("steps", "steps"),
               ("samples_per_second", "samples/s"), ("mse", "MSE"), ("ssim", "SSIM"),
               ("ssim_binarized", "SSIM bin"), ("lpips_alex", "LPIPS-alex")]
    print(f"{args.minutes:g} training minutes each on {args.threads} thread(s), {args.sampler} on {args.val_clips} "
          "validation clips:")
    print_table(sorted(results, key=lambda r: -r["ssim"]) + [baseline], columns)
    write_json(args.out, {"minutes": args.minutes, "threads": args.threads, "sampler": args.sampler,
                          "val_clips": args.val_clips, "base": BASE, "results": results, "copy_last": baseline,
                          **environment(torch.device("cpu"))})
    if args.curves:
        plot(Path(args.curves), results, baseline)


if __name__ == "__main__":
    main()
