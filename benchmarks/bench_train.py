"""Training speed per preset and precision, and model FLOP utilization (MFU).

usage: python benchmarks/bench_train.py [--presets tiny fast paper] [--precisions fp32 bf16]
           [--batch-size 64] [--channels-last] [--compile] [--fused-adamw] [--device cuda] [--out FILE.json]

A step is what train_mcvd.py does each step: draw fresh clips on the device, forward and
backward under the precision's autocast, clip gradients, AdamW. FLOPs per step (forward +
backward) are counted with torch.utils.flop_counter; MFU = FLOPs per step / (step time x the
device's dense matmul rate, measured in the same run with a large matmul, in bf16 where the device
runs bf16 natively, else in fp32: an emulated bf16 rate would make MFU meaningless). Every preset
also runs once as fp32 eager without fast paths: "speedup" is relative to that row.
"""

import argparse

import torch
from common import add_threads_option, apply_threads, digits_on, environment, matmul_tflops, median_seconds, pick_device, print_table, write_json
from torch.utils.flop_counter import FlopCounterMode

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers import PRESETS, MCVDUNet2DModel, make_noise_scheduler
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.runtime import (CHOICES_TEXT, autocast, bf16_is_native, maybe_compile, resolve_precision,
                                    to_channels_last)
from mcvd_diffusers.losses import diffusion_loss


def make_step(preset, precision, batch_size, device, channels_last=False, compile=False, fused=False):
    torch.manual_seed(0)
    unet = MCVDUNet2DModel.from_preset(preset).to(device).train()
    if channels_last:
        to_channels_last(unet)
    scheduler = make_noise_scheduler()
    data = MovingMNIST(digits_on(device), num_frames=unet.clip_length)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused or None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator(device).manual_seed(0)

    def step():
        with autocast(precision, device):
            loss = diffusion_loss(unet, scheduler, data.sample(batch_size, generator), generator)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    compiled = maybe_compile(unet, step) if compile else False
    return unet, scheduler, data, step, compiled


def count_step_flops(unet, scheduler, data, batch_size, device) -> float:
    clip = data.sample(batch_size, torch.Generator(device).manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(unet, scheduler, clip).backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "fast", "paper"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        help=f"of {CHOICES_TEXT} (auto: bf16 where the device runs it natively, else fp32)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median), after warm-up")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fused-adamw", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--out")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args)
    device = pick_device(args.device)
    unknown = set(args.presets) - set(PRESETS)
    if unknown:
        parser.error(f"unknown presets {sorted(unknown)}; choose from {sorted(PRESETS)}")
    try:  # auto as what it resolves to here; each precision once
        precisions = list(dict.fromkeys(resolve_precision(p, device, fp32="fp32") for p in args.precisions))
    except ValueError as e:
        parser.error(str(e))
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    peak_dtype = "bf16" if bf16_is_native(device) else "fp32"
    peak = matmul_tflops(device, dtype=torch.bfloat16 if peak_dtype == "bf16" else torch.float32)
    fast = [name for name, on in (("channels_last", args.channels_last), ("compile", args.compile),
                                  ("fused_adamw", args.fused_adamw)) if on]
    rows = []
    for preset in args.presets:
        unet, scheduler, data, baseline_step, _ = make_step(preset, "fp32", batch_size, device)
        flops = count_step_flops(unet, scheduler, data, batch_size, device)
        params = sum(p.numel() for p in unet.parameters())
        baseline = median_seconds(baseline_step, device, args.steps)
        variants = [("fp32", False)] + [(p, True) for p in precisions if p != "fp32" or fast]
        for precision, with_fast_paths in variants:
            if with_fast_paths:
                *_, step, compiled = make_step(preset, precision, batch_size, device, args.channels_last,
                                               args.compile, args.fused_adamw)
                seconds = median_seconds(step, device, args.steps)
                paths = [p for p in fast if p != "compile" or compiled]
            else:
                seconds, paths = baseline, []
            rows.append({
                "preset": preset, "precision": precision, "fast_paths": "+".join(paths) or "eager",
                "parameters_M": params / 1e6, "batch_size": batch_size, "step_s": seconds,
                "samples_per_s": batch_size / seconds, "train_GFLOP_per_sample": flops / batch_size / 1e9,
                "achieved_TFLOPs": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak,
                "speedup_vs_fp32_eager": baseline / seconds,
            })
    env = environment(device)
    print(f"device: {env['device']}; measured {peak_dtype} matmul peak {peak:.3g} TFLOP/s; "
          f"torch {env['versions']['torch']}")
    print_table(rows, [("preset", "preset"), ("precision", "precision"), ("fast_paths", "fast paths"),
                       ("parameters_M", "params (M)"), ("batch_size", "batch"), ("step_s", "step (s)"),
                       ("samples_per_s", "samples/s"), ("train_GFLOP_per_sample", "GFLOP/sample"),
                       ("achieved_TFLOPs", "TFLOP/s"), ("mfu", "MFU"), ("speedup_vs_fp32_eager", "speedup")])
    write_json(args.out, {**env, "matmul_peak_TFLOPs": peak, "matmul_peak_dtype": peak_dtype,
                          "requested_precisions": args.precisions, "results": rows})


if __name__ == "__main__":
    main()
