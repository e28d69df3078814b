"""Size and speed of each UNet preset: parameters, forward GFLOP, one training step, one sampling step.

usage: python benchmarks/bench_presets.py [--presets tiny paper] [--batch-size 8] [--device cpu] [--out FILE.json]

A training step is forward + backward + AdamW on a batch of fresh clips; a sampling step
is one UNet forward and one scheduler step for a single video (batch 1). Times are the
median of --repeats runs after one warm-up run, synchronized on CUDA.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mcvd_diffusers import PRESETS, MCVDUNet2DModel, make_noise_scheduler
from mcvd_diffusers.training import diffusion_loss


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(preset, batch_size, device, repeats):
    torch.manual_seed(0)
    unet = MCVDUNet2DModel.from_preset(preset).to(device)
    scheduler = make_noise_scheduler()
    clip = torch.rand(batch_size, unet.clip_length, *unet.frame_shape, device=device)
    past, current, _ = unet.split_clip(clip[:1])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(current, 10, past_frames=past)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def train_step():
        loss = diffusion_loss(unet, scheduler, clip)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    scheduler.set_timesteps(50)
    t = scheduler.timesteps[10]

    @torch.no_grad()
    def sample_step():
        output = unet(current, t, past_frames=past).sample
        scheduler.step(output, t, current)

    unet.train()
    train_s = timed(train_step, device, repeats)
    unet.eval()
    sample_s = timed(sample_step, device, repeats)
    return {
        "preset": preset,
        "parameters_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "forward_GFLOP_per_sample": round(counter.get_total_flops() / 1e9, 2),
        "train_batch_size": batch_size,
        "train_step_s": round(train_s, 4),
        "train_s_per_sample": round(train_s / batch_size, 4),
        "sampling_step_s_batch1": round(sample_s, 4),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    unknown = set(args.presets) - set(PRESETS)
    if unknown:
        parser.error(f"unknown presets {sorted(unknown)}; choose from {sorted(PRESETS)}")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    rows = [bench(p, args.batch_size, device, args.repeats) for p in args.presets]
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'preset':<8}{'params':>9}{'GFLOP/fwd':>11}{'train step':>12}{'per sample':>12}{'sample step':>13}")
    for r in rows:
        print(f"{r['preset']:<8}{r['parameters_M']:>8}M{r['forward_GFLOP_per_sample']:>11}{r['train_step_s']:>11}s"
              f"{r['train_s_per_sample']:>11}s{r['sampling_step_s_batch1']:>12}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
