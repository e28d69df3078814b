"""Evaluate samplers and baselines on the same test clips, in one run.

usage:
  python eval_mcvd.py --model PATH_OR_REPO --samplers ddpm:1000 ddim:50 dpm++:20 \\
      --num-clips 256 --samples-per-clip 10 --out results/NAME

Writes into --out: metrics.json, summary.md, per_clip.csv, curves.png, predictions.gif and
report.html (self-contained). Finished samplers are cached in --out/cache: rerunning an
interrupted evaluation skips them. Sampler names: see README.md (mcvd_diffusers.SAMPLERS).
"""

import argparse
import sys

from mcvd_diffusers.evaluation import EvalConfig, evaluate, summary_table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved MCVDPipeline folder or a Hub repo id")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--samplers", nargs="+", default=["ddpm:1000", "ddim:50", "dpm++:20"],
                        help="NAME:STEPS ..., or 'shipped': the model's own sampler at its default step count")
    parser.add_argument("--num-clips", type=int, default=256)
    parser.add_argument("--samples-per-clip", type=int, default=10, help="k, for mean-of-k and best-of-k")
    parser.add_argument("--num-frames", type=int, default=10, help="frames to predict after the past ones")
    parser.add_argument("--test-set", choices=["generated", "official"], default="generated",
                        help="the fixed generated test set, or the official mnist_test_seq.npy (last 1000 clips)")
    parser.add_argument("--test-file", help="path of mnist_test_seq.npy for --test-set official, or 'download' (into the "
                             "package cache, checksum verified)")
    parser.add_argument("--mnist-root", help="MNIST for the generated test set: a folder or 'bundled' "
                                             "(default: $MCVD_MNIST_DIR, else download)")
    parser.add_argument("--batch-size", type=int, default=64, help="videos sampled at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--gif-clips", type=int, default=4, help="clips shown in predictions.gif")
    parser.add_argument("--no-timing", action="store_true", help="skip the batch-1 latency measurement")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16: autocast for the UNet")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (eager if unsupported)")
    parser.add_argument("--update-model-card", action="store_true",
                        help="write the summary table into --model's README.md (a folder exported by train_mcvd.py)")
    parser.add_argument("--protocol", choices=["ours", "reproduction"], default="ours",
                        help="reproduction: the protocol of the reproduction we start from beside ours: 30 clips, one "
                             "sample each (unless --num-clips/--samples-per-clip say otherwise), every sampler also "
                             "scored after its contrast stretch (rows '+ stretch')")
    parser.add_argument("--fvd", action="store_true", help="add an FVD column (needs the I3D weights; see README)")
    parser.add_argument("--fvd-weights", help="I3D weights file (default: $MCVD_I3D_WEIGHTS, else the torch hub cache)")
    parser.add_argument("--fvd-frames", choices=["past+predicted", "predicted"], default="past+predicted",
                        help="the frames of each video FVD compares (MCVD: past + predicted)")
    parser.add_argument("--fvd-pooling", choices=["all", "per_sample"], default="all",
                        help="all: the k x N samples as one set; per_sample: one FVD per sample index, averaged")
    args = parser.parse_args(argv)
    explicit = set(arg.split("=")[0] for arg in (argv if argv is not None else sys.argv[1:]))
    if args.protocol == "reproduction":  # its defaults, where the command line names none
        args.num_clips = args.num_clips if "--num-clips" in explicit else 30
        args.samples_per_clip = args.samples_per_clip if "--samples-per-clip" in explicit else 1
    config = EvalConfig(model=args.model, out=args.out, samplers=args.samplers, num_clips=args.num_clips,
                        samples_per_clip=args.samples_per_clip, num_frames=args.num_frames, test_set=args.test_set,
                        test_file=args.test_file, mnist_root=args.mnist_root, batch_size=args.batch_size,
                        seed=args.seed, device=args.device, gif_clips=args.gif_clips, timing=not args.no_timing,
                        precision=args.precision, compile=args.compile,
                        update_model_card=args.update_model_card, stretch=args.protocol == "reproduction",
                        fvd=args.fvd, fvd_weights=args.fvd_weights, fvd_include_past=args.fvd_frames != "predicted",
                        fvd_pooling=args.fvd_pooling)
    try:
        record = evaluate(config)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"\ninterrupted: samplers that finished are cached in {args.out}/cache; the same command resumes",
              file=sys.stderr)
        sys.exit(130)
    print(f"\n{record['eval_config']['num_clips']} clips, {record['data_source']}; device {record['device']}\n")
    print(summary_table(record))
    print(f"\nreport: {args.out}/report.html (also metrics.json, summary.md, per_clip.csv, curves.png, predictions.gif)")


if __name__ == "__main__":
    main(sys.argv[1:])
