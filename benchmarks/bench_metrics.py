"""Scoring speed: seconds per predicted video for each per-frame metric of eval_mcvd.py, on the device.

usage: python benchmarks/bench_metrics.py [--videos 32] [--frames 10] [--repeats 3] [--device cuda] [--out FILE.json]

On a CPU most of an evaluation's time goes to scoring, not sampling: every row (ground truth, copy-last,
each sampler's k samples) is scored on every frame, and LPIPS-VGG dominates. Each metric is timed alone on
random 64x64 grey videos (the time does not depend on the content); LPIPS is also timed with its network in
the default (NCHW) layout, against the channels_last layout the library uses.
"""

import argparse

import torch
from common import add_threads_option, apply_threads, environment, median_seconds, pick_device, print_table, write_json

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers.metrics import LPIPS_BACKBONES, METRICS, FrameMetrics, lpips_input


def main():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=32, help="videos scored at once (eval_mcvd.py's batch)")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device")
    parser.add_argument("--out")
    add_threads_option(parser)
    args = parser.parse_args()
    if min(args.videos, args.frames, args.repeats) < 1:
        parser.error("--videos, --frames and --repeats must be >= 1")
    apply_threads(parser, args)
    device = pick_device(args.device)
    generator = torch.Generator().manual_seed(0)
    prediction, target = (torch.rand(args.videos, args.frames, 1, 64, 64, generator=generator).to(device)
                          for _ in range(2))
    rows = []
    for name in METRICS:  # as eval_mcvd.py scores them, one at a time
        scorer = FrameMetrics(device, metrics=(name,))
        seconds = median_seconds(lambda m=scorer: m(prediction, target), device, args.repeats)
        rows.append({"metric": name, "layout": "channels_last" if name in LPIPS_BACKBONES else "",
                     "seconds_per_video": seconds / args.videos})
        if name in ("lpips_alex", "lpips_vgg"):  # the same network and frames in torch's default layout
            metric = scorer.lpips[name].to(memory_format=torch.contiguous_format)
            frames = [lpips_input(x, torch.contiguous_format) for x in (prediction, target)]
            seconds = median_seconds(lambda m=metric: (m.reset(), m.update(*frames), m.compute()), device,
                                     args.repeats)
            rows.append({"metric": name, "layout": "nchw", "seconds_per_video": seconds / args.videos})
    scorer = FrameMetrics(device)
    seconds = median_seconds(lambda: scorer(prediction, target), device, args.repeats)
    rows.append({"metric": "all", "layout": "", "seconds_per_video": seconds / args.videos})
    env = environment(device)
    print(f"device: {env['device']}; {args.videos} videos of {args.frames} frames, 64x64")
    print_table(rows, [("metric", "metric"), ("layout", "layout"), ("seconds_per_video", "s/video")])
    write_json(args.out, {**env, "videos": args.videos, "frames": args.frames, "results": rows})


if __name__ == "__main__":
    main()
