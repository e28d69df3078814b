"""Data generation speed: Moving MNIST sequences per second on the device, against training's need.

usage: python benchmarks/bench_data.py [--batch-sizes 64 1024] [--preset paper] [--train-batch-size 64]
           [--device cuda] [--out FILE.json]

Training draws fresh clips every step on its own device; this shows generation is never the
bottleneck: its rate is compared with the samples per second of one training step of --preset
(forward + backward + AdamW, fp32 eager) at --train-batch-size.
"""

import argparse

import torch
from bench_train import make_step
from common import add_threads_option, apply_threads, digits_on, environment, median_seconds, pick_device, print_table, write_json

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers import PRESETS
from mcvd_diffusers.data.moving_mnist import MOTIONS, MovingMNIST


def main():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 64 1024 (CPU: 16 256)")
    parser.add_argument("--num-frames", type=int, default=15)
    parser.add_argument("--motion", default="deterministic", choices=MOTIONS)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--train-batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device")
    parser.add_argument("--out")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args)
    device = pick_device(args.device)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    batch_sizes = args.batch_sizes or ([64, 1024] if device.type == "cuda" else [16, 256])
    train_batch = args.train_batch_size or (64 if device.type == "cuda" else 8)
    data = MovingMNIST(digits_on(device), num_frames=args.num_frames, motion=args.motion)
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    for batch in [*batch_sizes, train_batch]:
        seconds = median_seconds(lambda b=batch: data.sample(b, generator), device, args.repeats)
        rows.append({"batch_size": batch, "seconds": seconds, "sequences_per_s": batch / seconds})
    *_, step, _ = make_step(args.preset, "fp32", train_batch, device)
    train_rate = train_batch / median_seconds(step, device, 3)
    data_rate = rows.pop()["sequences_per_s"]  # at the training batch size
    env = environment(device)
    print(f"device: {env['device']}; torch {env['versions']['torch']}")
    print_table(rows, [("batch_size", "batch"), ("seconds", "seconds"), ("sequences_per_s", "sequences/s")])
    ratio = data_rate / train_rate
    print(f"at batch {train_batch}: generation {data_rate:.4g} sequences/s vs training ({args.preset}) "
          f"{train_rate:.4g} samples/s: {ratio:.1f}x")
    write_json(args.out, {**env, "results": rows, "train_preset": args.preset, "train_batch_size": train_batch,
                          "data_sequences_per_s_at_train_batch": data_rate, "train_samples_per_s": train_rate,
                          "data_over_train_ratio": ratio})


if __name__ == "__main__":
    main()
