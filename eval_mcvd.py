"""Evaluate samplers and baselines on the same test clips, in one run.

usage:
  python eval_mcvd.py --model PATH_OR_REPO --samplers ddpm:1000 ddim:50 dpm++:20 \\
      --num_clips 256 --samples_per_clip 10 --out results/NAME
  python eval_mcvd.py --model PATH_OR_REPO --samplers shipped --protocol reproduction --out results/NAME
  python eval_mcvd.py --model checkpoints/mmnist-general --task interpolate|generate --samplers shipped --out DIR

Writes into --out: metrics.json, summary.md, per_clip.csv, curves.png, predictions.gif and
report.html (self-contained). Finished samplers are cached in --out/cache: rerunning an
interrupted evaluation skips them. Every key of mcvd_diffusers.evaluation.EvalConfig is a flag
(listed below); sampler names: see docs/usage.md (mcvd_diffusers.SAMPLERS).
"""

import argparse
import sys

from mcvd_diffusers.cli import FlagParser, add_config_flags, given_values, refuse_unknown_flags
from mcvd_diffusers.config import coerce
from mcvd_diffusers.evaluation import REPRODUCTION_PROTOCOL, EvalConfig, evaluate
from mcvd_diffusers.report import protocol_tables, summary_table
from mcvd_diffusers.run_lock import RunFolderInUse
from mcvd_diffusers.tasks import generation_table

# Flags of earlier versions that are not a respelling of a key.
RENAMED = {"--no-timing": "--timing false", "--fvd-frames": "--fvd_include_past true|false"}


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["ours", "reproduction"], default="ours",
                        help="reproduction: the protocol of the reproduction we start from beside ours: "
                             f"{REPRODUCTION_PROTOCOL} unless given")
    add_config_flags(parser, EvalConfig, required=("model", "out"))
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    refuse_unknown_flags(parser, argv, EvalConfig, RENAMED)
    args = parser.parse_args(argv)
    given = given_values(args, EvalConfig)
    try:
        values = {key: coerce(EvalConfig, key, value) for key, value in given.items()}
        if args.protocol == "reproduction":
            values = {**REPRODUCTION_PROTOCOL, **values}  # where the command line says nothing else
        config = EvalConfig(**values)
        record = evaluate(config)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    except RunFolderInUse as e:  # one line, exit code 1, nothing touched
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: samplers that finished are cached in {args.out}/cache; the same command resumes",
              file=sys.stderr)
        sys.exit(130)
    if record.get("task") == "generate":
        print(f"\n{record['eval_config']['num_clips']} videos per row; device {record['device']}\n")
        print(generation_table(record))
        print(f"\nresults: {args.out}/summary.md (also metrics.json, curves.png, generated.gif)")
        return
    print(f"\n{record['eval_config']['num_clips']} clips, {record['data_source']}; device {record['device']}\n")
    print(summary_table(record))
    for title, table in protocol_tables(record):
        print(f"\n{title}\n{table}")
    print(f"\nreport: {args.out}/report.html (also metrics.json, summary.md, per_clip.csv, curves.png, predictions.gif)")


if __name__ == "__main__":
    main(sys.argv[1:])
