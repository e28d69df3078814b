"""Train MCVD on Moving MNIST.

usage:
  python train_mcvd.py --config configs/tiny.yaml [--key value ...]
  accelerate launch train_mcvd.py --config configs/paper.yaml [--key value ...]

Every key of mcvd_diffusers.training.TrainConfig can be set in the config file or
overridden on the command line (--max_steps 500, --mnist_root bundled, ...).
"""

import argparse
import sys

from mcvd_diffusers.training import TrainConfig, load_config_file, parse_overrides, train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig keys")
    args, overrides = parser.parse_known_args(argv)
    try:
        values = load_config_file(args.config) if args.config else {}
        values.update(parse_overrides(overrides))
        config = TrainConfig.from_dict(values)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    train(config)


if __name__ == "__main__":
    main(sys.argv[1:])
