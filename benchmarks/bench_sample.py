"""Sampling speed: videos per second for each sampler, at batch 1 and at large batches.

usage: python benchmarks/bench_sample.py [--preset paper | --model PATH] [--samplers ddpm:1000 ddim:50 dpm++:20]
           [--batch-sizes 1 max] [--precision bf16] [--compile] [--device cuda] [--out FILE.json]

One "video" is a full prediction (5 past -> 10 frames) with MCVDPipeline. Each timing follows a
warm-up call and is synchronized. "max" doubles the batch from 64 until the GPU runs out of
memory (or --max-batch) and reports the largest that ran. Speed does not depend on the
weights, so a freshly initialized preset stands in for a trained model unless --model is given.
"""

import argparse

import torch
from common import add_threads_option, apply_threads, environment, median_seconds, peak_memory_gib, pick_device, print_table, reset_peak_memory, write_json

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers import PRESETS, MCVDPipeline, MCVDUNet2DModel, make_noise_scheduler
from mcvd_diffusers.schedulers import SamplerSpec
from mcvd_diffusers.runtime import CHOICES_TEXT, autocast, maybe_compile, resolve_precision


def time_batch(pipe, sampler_steps, batch_size, device, precision, num_frames, repeats):
    cfg = pipe.unet.config
    past = torch.rand(batch_size, cfg.num_past_frames, *pipe.unet.frame_shape, device=device)
    reset_peak_memory(device)
    with autocast(precision, device):
        pipe(past, num_frames=num_frames, num_inference_steps=min(2, sampler_steps))  # warm-up
        seconds = median_seconds(lambda: pipe(past, num_frames=num_frames, num_inference_steps=sampler_steps),
                                 device, repeats, warmup=0)
    return {"batch_size": batch_size, "seconds_per_batch": seconds, "videos_per_s": batch_size / seconds,
            "seconds_per_video": seconds / batch_size, "peak_memory_GiB": peak_memory_gib(device)}


def largest_batch(pipe, steps, device, precision, num_frames, repeats, max_batch):
    best, batch = None, 64
    while batch <= max_batch:
        try:
            best = time_batch(pipe, steps, batch, device, precision, num_frames, repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        batch *= 2
    return best


def main():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help=f"of {sorted(PRESETS)} (ignored with --model)")
    parser.add_argument("--model", help="a saved MCVDPipeline folder")
    parser.add_argument("--samplers", nargs="+", default=["ddpm:1000", "ddim:50", "dpm++:20"])
    parser.add_argument("--batch-sizes", nargs="+", default=None, help="numbers and/or 'max' (default: 1 max on "
                                                                       "CUDA, 1 4 on CPU)")
    parser.add_argument("--max-batch", type=int, default=8192)
    parser.add_argument("--num-frames", type=int, default=10)
    parser.add_argument("--precision", default="fp32", help=f"autocast for the UNet: {CHOICES_TEXT} (auto: bf16 where "
                                                             "the device runs it natively, else fp32)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch size (their median is reported)")
    parser.add_argument("--device")
    parser.add_argument("--out")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args)
    device = pick_device(args.device)
    try:
        samplers = [SamplerSpec.parse(s) for s in args.samplers]
        precision = resolve_precision(args.precision, device, fp32="fp32")  # the rows record what ran
        if not args.model and args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
        batch_sizes = args.batch_sizes or (["1", "max"] if device.type == "cuda" else ["1", "4"])
        if "max" in batch_sizes and device.type != "cuda":
            raise ValueError("--batch-sizes max searches GPU memory; give numbers on CPU")
        if any(b != "max" and (not b.isdigit() or int(b) < 1) for b in batch_sizes):
            raise ValueError(f"--batch-sizes takes integers >= 1 and 'max', got {batch_sizes}")
    except ValueError as e:
        parser.error(str(e))
    if args.model:
        pipe = MCVDPipeline.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        pipe = MCVDPipeline(unet=MCVDUNet2DModel.from_preset(args.preset), scheduler=make_noise_scheduler())
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    compiled = False
    if args.compile:
        past = torch.rand(1, pipe.unet.config.num_past_frames, *pipe.unet.frame_shape, device=device)
        with autocast(precision, device):
            compiled = maybe_compile(pipe.unet, lambda: pipe(past, num_inference_steps=1))
    rows = []
    trained_config = pipe.scheduler.config  # every sampler from the pipeline's own config, not the previous one's
    for sampler in samplers:
        spec, steps = str(sampler), sampler.steps
        pipe.scheduler = sampler.build(trained_config)
        for batch in batch_sizes:
            if batch == "max":
                result = largest_batch(pipe, steps, device, precision, args.num_frames, args.repeats,
                                       args.max_batch)
            else:
                result = time_batch(pipe, steps, int(batch), device, precision, args.num_frames, args.repeats)
            if result:
                rows.append({"sampler": spec, "precision": precision, "compiled": compiled, **result})
    env = environment(device)
    print(f"device: {env['device']}; model: {args.model or 'preset ' + args.preset}; torch {env['versions']['torch']}")
    print_table(rows, [("sampler", "sampler"), ("precision", "precision"), ("compiled", "compiled"),
                       ("batch_size", "batch"), ("seconds_per_video", "s/video"), ("videos_per_s", "videos/s"),
                       ("peak_memory_GiB", "peak mem (GiB)")])
    write_json(args.out, {**env, "model": args.model or f"preset {args.preset}", "requested_precision": args.precision,
                          "results": rows})


if __name__ == "__main__":
    main()
