"""Predict test clips with several samplers and compare them.

usage:
  python eval_mcvd.py --model PATH_OR_REPO --samplers ddpm:1000 ddim:50 --num-clips 4 --out results/NAME

Writes predictions.gif (past | ground truth | each sampler) and metrics.json into --out.
Sampler names: see mcvd_diffusers.schedulers.SAMPLERS.
"""

import argparse
import sys

from mcvd_diffusers.evaluation import evaluate_samplers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved MCVDPipeline folder or a Hub repo id")
    parser.add_argument("--samplers", nargs="+", default=["ddpm:1000", "ddim:50"], help="NAME:STEPS ...")
    parser.add_argument("--num-clips", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=10, help="frames to predict after the past ones")
    parser.add_argument("--mnist-root", default=None,
                        help="MNIST folder for the test clips, or 'bundled' (default: $MCVD_MNIST_DIR, else download)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True, help="results folder")
    args = parser.parse_args(argv)
    try:
        record = evaluate_samplers(args.model, args.samplers, args.num_clips, args.out, mnist_root=args.mnist_root,
                                   num_frames=args.num_frames, seed=args.seed, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(f"test clips: {record['num_clips']} from {record['test_set']['data_source']}")
    print(f"{'prediction':<18} {'MSE':>8}")
    for label, numbers in record["results"].items():
        print(f"{label:<18} {numbers['mse']:>8.4f}")
    print(f"wrote {args.out}/{record['gif']} and {args.out}/metrics.json")


if __name__ == "__main__":
    main(sys.argv[1:])
