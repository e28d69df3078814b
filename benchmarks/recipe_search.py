"""Which training recipe learns video prediction fastest per CPU-minute? Candidates at equal CPU time.

usage: python benchmarks/recipe_search.py [--round 2] [--minutes 15] [--threads 1] [--parallel 2]
           [--candidates NAME ...] [--mnist-root DIR] [--val-clips 32] [--sampler ddim:20]
           [--final-samplers ddim:5 ddim:10 ...] [--out-dir results/recipe_search]
           [--out FILE.json] [--curves FILE.png]

Each candidate is a set of training-config keys (``TrainConfig``) over its round's base. Round 1
asked which size, target and optimizer settings learn fastest; round 2 starts from its winner (the
shipped cpu recipe) and asks about the block size (frames generated per denoising pass, rolled out
to 10), the first level's width, the patch size, x0 relative to the last past frame, the noise
shift and context noise augmentation. Every candidate is scored on the same task: the 10 frames
after the past, whatever its block size; at the end also with each of ``--final-samplers`` (the
steps per block). It trains in
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
from common import environment, print_table, score, split_past_target, write_json
from diffusers.training_utils import EMAModel

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.evaluation import copy_last_frame
from mcvd_diffusers.metrics import FrameMetrics
from mcvd_diffusers.runtime import autocast, resolve_precision
from mcvd_diffusers.schedulers import SamplerSpec, make_noise_scheduler
from mcvd_diffusers.config import TrainConfig, build_unet
from mcvd_diffusers.losses import diffusion_loss
from mcvd_diffusers.validation import ValidationSet

# What every candidate of round 1 shares unless it says otherwise: the cpu preset's widths at patch 2, x0 prediction.
# Precision auto: bf16 on the Intel Xeon these rounds ran on (native there), fp32 on a CPU that would emulate bf16
# 20x slower (an AMD EPYC Zen 3), where equal CPU time would otherwise buy a bf16 candidate 1/20 of its steps.
BASE = dict(preset="cpu", patch_size=2, prediction_type="sample", batch_size=16, learning_rate=1e-3, mixed_precision="auto",
            beta_schedule="cosine", noise_shift=1.0, min_snr_gamma=None, ema_decay=0.999)
ROUND1: dict[str, dict] = {
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
# Round 2 starts from round 1's winner, the shipped recipe (configs/cpu.yaml: patch 4, 64/128/128, batch 64).
BASE2 = dict(preset="cpu", prediction_type="sample", batch_size=64, learning_rate=1e-3, mixed_precision="auto",
             beta_schedule="cosine", noise_shift=1.0, min_snr_gamma=None, ema_decay=0.999)
ROUND2: dict[str, dict] = {
    "b10": dict(num_current_frames=10),  # the shipped layout: 10 frames per pass
    "b5": dict(num_current_frames=5),  # MCVD's big SMMNIST model
    "b2": dict(num_current_frames=2),  # MCVD's small SMMNIST model
    "b1": dict(num_current_frames=1),
    # at the best block size (2, after the first pairs)
    "b2-w128": dict(num_current_frames=2, block_out_channels=[128, 128, 128]),
    "b2-p2": dict(num_current_frames=2, patch_size=2),
    "b2-shift2": dict(num_current_frames=2, noise_shift=2.0),
    "b2-ctx0.1": dict(num_current_frames=2, past_noise_augment=0.1),  # context noise augmentation (GameNGen)
    "b5-w128": dict(num_current_frames=5, block_out_channels=[128, 128, 128]),
    "b5-p2": dict(num_current_frames=5, patch_size=2),
    "b5-shift2": dict(num_current_frames=5, noise_shift=2.0),
    "b5-ctx0.1": dict(num_current_frames=5, past_noise_augment=0.1),
}
ROUNDS = {1: (BASE, ROUND1), 2: (BASE2, ROUND2)}
CANDIDATES = {**ROUND1, **ROUND2}
METRICS = ("mse", "ssim", "ssim_binarized", "lpips_alex")
WARMUP_STEPS = 100


def candidate_config(name: str, mnist_root: str | None, val_clips: int) -> TrainConfig:
    base = BASE2 if name in ROUND2 else BASE
    return TrainConfig.from_dict({**base, **CANDIDATES[name], "mnist_root": mnist_root, "val_clips": val_clips,
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
    precision = resolve_precision(config.mixed_precision, "cpu", fp32="fp32")  # auto as it resolves here
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
                                  config.min_snr_gamma, config.past_noise_augment)
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
    ema.copy_to(unet.parameters())  # the final weights with every sampler of --final-samplers (steps per block)
    with autocast(precision, "cpu"):
        final = {spec: score(unet, scheduler, clips, spec, frame_metrics) for spec in args.final_samplers}
    for spec, scores in final.items():
        print(f"{name} final, {spec}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    return {"name": name, "overrides": CANDIDATES[name], "config": config.to_dict(), "final_samplers": final,
            "parameters": sum(p.numel() for p in unet.parameters()), "steps": step, "precision": precision,
            "samples_per_second": step * config.batch_size / trained, "curve": curve, **curve[-1]}


def copy_last_scores(args) -> dict:
    config = candidate_config("p2-x0", args.mnist_root, args.val_clips)
    unet = build_unet(config)
    past, target = split_past_target(unet, ValidationSet(load_mnist("val", root=config.mnist_root), unet, config).clips)
    values = FrameMetrics(metrics=METRICS)(copy_last_frame(past, target.shape[1]), target)
    scores = {k: v.mean().item() for k, v in values.items()}
    scores.update({f"ssim_f{f}": values["ssim"][:, f - 1].mean().item() for f in (1, 5, 10)})
    return {"name": "copy-last", **scores}


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
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round", type=int, default=2, choices=sorted(ROUNDS), help="the round's candidates")
    parser.add_argument("--candidates", nargs="+", default=None, choices=list(CANDIDATES),
                        help="default: every candidate of --round")
    parser.add_argument("--minutes", type=float, default=15.0, help="training minutes per candidate")
    parser.add_argument("--threads", type=int, default=1, help="threads per candidate")
    parser.add_argument("--parallel", type=int, default=2, help="candidates trained at once")
    parser.add_argument("--mnist-root", default=None)
    parser.add_argument("--val-clips", type=int, default=32)
    parser.add_argument("--sampler", default="ddim:20", help="the learning curves' sampler (steps per block)")
    parser.add_argument("--final-samplers", nargs="+", default=["ddim:5", "ddim:10", "ddim:20"],
                        help="every candidate's final weights are also scored with each (steps per block)")
    parser.add_argument("--out-dir", default="results/recipe_search", help="one JSON per candidate")
    parser.add_argument("--out", default=None, help="the whole table as JSON")
    parser.add_argument("--curves", default=None, help="learning curves as PNG")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minutes <= 0 or args.threads < 1 or args.parallel < 1 or args.val_clips < 1:
        parser.error("--minutes must be > 0, --threads, --parallel and --val-clips >= 1")
    try:
        for spec in (args.sampler, *args.final_samplers):
            SamplerSpec.parse(spec)
    except ValueError as e:
        parser.error(str(e))
    args.candidates = args.candidates or list(ROUNDS[args.round][1])
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
               ("ssim_f1", "SSIM f1"), ("ssim_f5", "SSIM f5"), ("ssim_f10", "SSIM f10"),
               ("ssim_binarized", "SSIM bin"), ("lpips_alex", "LPIPS-alex")]
    print(f"{args.minutes:g} training minutes each on {args.threads} thread(s), {args.sampler} on {args.val_clips} "
          "validation clips:")
    print_table(sorted(results, key=lambda r: -r["ssim"]) + [baseline], columns)
    write_json(args.out, {"round": args.round, "minutes": args.minutes, "threads": args.threads, "sampler": args.sampler,
                          "final_samplers": args.final_samplers, "val_clips": args.val_clips,
                          "base": ROUNDS[args.round][0], "results": results, "copy_last": baseline,
                          **environment(torch.device("cpu"))})
    if args.curves:
        plot(Path(args.curves), results, baseline)


if __name__ == "__main__":
    main()
