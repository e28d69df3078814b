"""Writes the small MNIST sample shipped in mcvd_diffusers/data/bundled (run once, by maintainers).

usage: python scripts/make_bundled_mnist.py MNIST_DIR [--train 4000] [--test 500]
Takes the first N digits of each split, in the standard gzip'd idx format, so the
package's own idx reader loads it like any MNIST folder.
"""

import argparse
import gzip
import struct
from pathlib import Path

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers.data.mnist import IDX_FILES, bundled_mnist_dir, load_mnist, read_idx


def write_idx_gz(path: Path, array) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    # mtime=0 keeps the bytes identical from run to run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(header + array.tobytes())


def main() -> None:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mnist_dir")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=500)
    args = parser.parse_args()
    load_mnist("train", root=args.mnist_dir)  # validates the folder first
    out = bundled_mnist_dir()
    for (split, _kind), stem in IDX_FILES.items():
        path = Path(args.mnist_dir) / (stem + ".gz")
        array = read_idx(path if path.exists() else Path(args.mnist_dir) / stem)
        write_idx_gz(out / (stem + ".gz"), array[: args.train if split == "train" else args.test])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
