"""FVD feature extraction speed: videos per second through I3D, per precision and memory layout, on the device.

usage: python benchmarks/bench_fvd.py [--videos 16] [--batch-size 8] [--settings fp32 bf16 ...]
           [--weights PATH | random] [--repeats 1] [--threads 2] [--device cpu] [--out FILE.json]

Each video is what eval_mcvd.py's FVD sees: 15 Moving MNIST frames, 64x64 grey, resized to 224 px and scaled to
[-1, 1] by fvd.i3d_inputs, then I3D's 400 logits (the features), --batch-size videos per call as fvd.i3d_features
does; the resize is timed too. Settings: fp32 in torch's default layout, fp32 with the network and inputs in
channels_last_3d (what fvd.i3d_features runs), and bf16 autocast in either layout (only where the device runs bf16
natively: emulated bf16 is far slower than fp32). "max_rel_error" is max |features - fp32 features| /
max |fp32 features| over all videos; with --weights random it says little about the trained network's.
"""

import argparse
import copy
import os

import torch
from common import (
    add_threads_option,
    apply_threads,
    digits_on,
    environment,
    median_seconds,
    pick_device,
    print_table,
    write_json,
)

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.fvd import i3d_inputs
from mcvd_diffusers.models.i3d import load_i3d
from mcvd_diffusers.runtime import autocast, bf16_is_native

SETTINGS = {"fp32": ("fp32", torch.contiguous_format), "fp32-channels-last": ("fp32", torch.channels_last_3d),
            "bf16": ("bf16", torch.contiguous_format), "bf16-channels-last": ("bf16", torch.channels_last_3d)}
FRAMES, FRAME_SIZE = 15, 64


@torch.inference_mode()
def features(i3d, videos: torch.Tensor, batch_size: int, precision: str, layout, device) -> torch.Tensor:
    """(N, T, 1, 64, 64) frames in [0, 1] -> (N, 400) fp32 features, as fvd.i3d_features computes them."""
    out = []
    for i in range(0, len(videos), batch_size):
        x = i3d_inputs(videos[i : i + batch_size]).contiguous(memory_format=layout)
        with autocast(precision, device):
            out.append(i3d(x).float())
    return torch.cat(out).cpu()


def main():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16, help="videos per timing")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per I3D call (fvd.i3d_features' default)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        help=f"from {', '.join(SETTINGS)}; bf16 rows are skipped where bf16 is emulated")
    parser.add_argument("--weights", help="I3D weights (default: as load_i3d finds them; 'random': an untrained "
                                          "network, same speed)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the videos (the median is kept)")
    parser.add_argument("--device")
    parser.add_argument("--out")
    add_threads_option(parser)
    args = parser.parse_args()
    if min(args.videos, args.batch_size, args.repeats) < 1:
        parser.error("--videos, --batch-size and --repeats must be >= 1")
    if unknown := [s for s in args.settings if s not in SETTINGS]:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    apply_threads(parser, args)
    device = pick_device(args.device)
    try:
        i3d = load_i3d(args.weights, device)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    generator = torch.Generator(device).manual_seed(0)
    videos = MovingMNIST(digits_on(device), num_frames=FRAMES).sample(args.videos, generator)
    native_bf16 = bf16_is_native(device)
    rows, reference = [], None
    for name in dict.fromkeys(["fp32", *args.settings]):  # fp32 first: the reference of the errors
        precision, layout = SETTINGS[name]
        if precision == "bf16" and not native_bf16:
            print(f"skipping {name}: {device.type} runs bf16 emulated here")
            continue
        model = i3d if layout == torch.contiguous_format else copy.deepcopy(i3d).to(memory_format=layout)

        def run(model=model, precision=precision, layout=layout):
            return features(model, videos, args.batch_size, precision, layout, device)

        features(model, videos[: args.batch_size], args.batch_size, precision, layout, device)  # warm-up batch
        seconds = median_seconds(run, device, args.repeats, warmup=0)
        result = run()
        reference = result if reference is None else reference
        error = ((result - reference).abs().max() / reference.abs().max()).item()
        if name in args.settings:
            rows.append({"setting": name, "precision": precision, "layout": str(layout).removeprefix("torch."),
                         "seconds": seconds, "videos_per_s": args.videos / seconds, "max_rel_error": error,
                         "load_average_1min": round(os.getloadavg()[0], 2)})
    fp32 = next((r["videos_per_s"] for r in rows if r["setting"] == "fp32"), None)
    for row in rows:
        row["speedup"] = None if fp32 is None else row["videos_per_s"] / fp32
    env = environment(device)
    print(f"device: {env['device']}; {args.videos} videos of {FRAMES} frames {FRAME_SIZE}x{FRAME_SIZE} grey -> 224, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads; weights: {args.weights or 'load_i3d()'}")
    print_table(rows, [("setting", "setting"), ("videos_per_s", "videos/s"), ("speedup", "vs fp32"),
                       ("max_rel_error", "max rel err"), ("load_average_1min", "load 1 min")])
    write_json(args.out, {**env, "videos": args.videos, "frames": FRAMES, "frame_size": FRAME_SIZE,
                          "batch_size": args.batch_size, "weights": args.weights or "load_i3d()",
                          "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "results": rows})


if __name__ == "__main__":
    main()
