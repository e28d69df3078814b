"""Train MCVD on Moving MNIST.

usage:
  python train_mcvd.py --config configs/tiny.yaml [--key value ...]
  accelerate launch train_mcvd.py --config configs/paper.yaml [--key value ...]
  python train_mcvd.py --config configs/tiny.yaml --resume_from_checkpoint latest
  python train_mcvd.py --export runs/tiny/checkpoints/checkpoint-400 --to runs/tiny/export-400 [--export_sampler ddim:20]
  python train_mcvd.py --push runs/tiny/pipeline --hub_model_id USER/NAME [--hub_private]

Every key of mcvd_diffusers.config.TrainConfig (listed below, documented in configs/*.yaml) can be
set in the config file or on the command line (--max_steps 500, --mnist_root bundled,
--push_to_hub --hub_model_id USER/NAME, ...); the command line wins.
"""

import argparse
import sys

from mcvd_diffusers.cli import FlagParser, add_config_flags, given_values, refuse_unknown_flags
from mcvd_diffusers.config import TrainConfig, load_config_file
from mcvd_diffusers.export import export_checkpoint
from mcvd_diffusers.hub import HubUploadError, push_to_hub
from mcvd_diffusers.interrupt import TrainingInterrupted
from mcvd_diffusers.run_lock import RunFolderInUse
from mcvd_diffusers.trainer import train



def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig keys")
    parser.add_argument("--export", metavar="CHECKPOINT", help="export a checkpoint's EMA weights as a pipeline")
    parser.add_argument("--to", metavar="FOLDER", help="where --export writes the pipeline")
    parser.add_argument("--push", metavar="FOLDER", help="upload an exported pipeline folder to --hub_model_id")
    add_config_flags(parser, TrainConfig, title="the keys of TrainConfig (each may also come from --config)")
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    refuse_unknown_flags(parser, argv, TrainConfig)
    args = parser.parse_args(argv)
    options = given_values(args, TrainConfig)
    try:
        if args.export or args.push:
            allowed = {"hub_model_id", "hub_private"} | ({"export_sampler"} if args.export else set())
            unknown = sorted(set(options) - allowed)
            if unknown:
                parser.error(f"--export and --push take only --hub_model_id and --hub_private (and --export "
                             f"--export_sampler NAME:STEPS), got {unknown}")
            if args.export:
                if not args.to:
                    parser.error("--export needs --to FOLDER")
                folder = export_checkpoint(args.export, args.to, options.pop("export_sampler", None))
                print(f"exported {args.export} to {folder}")
            if args.push:
                push = TrainConfig.from_dict({"push_to_hub": True, **options})  # typed and validated like a config
                try:
                    print(push_to_hub(args.push, push.hub_model_id, private=push.hub_private))
                except HubUploadError as e:
                    sys.exit(f"error: {e}")
            return
        values = load_config_file(args.config) if args.config else {}
        config = TrainConfig.from_dict({**values, **options})
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        train(config, command=" ".join(["python train_mcvd.py", *argv]))
    except TrainingInterrupted as e:  # SIGTERM or Ctrl-C during the loop: a checkpoint was saved
        print(f"{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the loop or during the final export: no step is lost
        print("interrupted outside the training loop; its checkpoints are kept (resume with "
              "--resume_from_checkpoint latest)", file=sys.stderr)
        sys.exit(130)
    # bad data, an incompatible resume, a run in the way or in the folder, a full disk, a failed upload
    except (ValueError, FileNotFoundError, OSError, HubUploadError, RunFolderInUse) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
