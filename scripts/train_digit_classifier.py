"""Trains the digit classifier that eval_mcvd.py's digit-identity metric reads predicted frames with.

usage:
  python scripts/train_digit_classifier.py --mnist_root PATH [--epochs 5] [--out mcvd_diffusers/assets]

Trains ``mcvd_diffusers.digit_classifier.DigitClassifier`` on MNIST train digits (the project's loader,
split "train": the held-out last 5000 are its validation set), with augmentation for what it will read in
predicted frames: small shifts, rotations and scalings (a window at the true position of a digit drawn
slightly off), blur and dimming (diffusion samples are soft and grey), and with probability 0.3 a second digit
pasted over at most half of the window (Moving MNIST digits overlap). Reports the MNIST test accuracy, and
writes digit_classifier.safetensors and its card digit_classifier.json (accuracies, command, time, CPU) into
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers.data.mnist import load_mnist  # noqa: E402
from mcvd_diffusers.digit_classifier import ASSETS, DIGIT_SIZE, DigitClassifier, weights_sha256  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _translate(images: torch.Tensor, shift: torch.Tensor, angle=None, scale=None) -> torch.Tensor:
    """(N, 1, 28, 28) images moved by ``shift`` (N, 2) pixels (row, col), optionally rotated and scaled."""
    n = len(images)
    angle = torch.zeros(n) if angle is None else angle
    scale = torch.ones(n) if scale is None else scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # grid_sample maps output to input coordinates: x_in = A x_out - t (normalized to [-1, 1])
    theta = torch.stack([torch.stack([cos, -sin, -2 * shift[:, 1] / DIGIT_SIZE], -1),
                         torch.stack([sin, cos, -2 * shift[:, 0] / DIGIT_SIZE], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A batch (N, 1, 28, 28) in [0, 1] -> its augmented copy (see the module docstring)."""
    n = len(images)
    rand = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    shift = (rand(n, 2) * 2 - 1) * 2.5
    angle = (rand(n) * 2 - 1) * (12 * torch.pi / 180)
    scale = 0.9 + rand(n) * 0.2
    out = _translate(images, shift, angle, scale)
    # another digit over at most half of the window: an integer shift with overlap area <= 392 pixels
    intruder = rand(n) < 0.3
    if intruder.any():
        m = int(intruder.sum())
        other = images[torch.randint(n, (m,), generator=generator)]
        overlap = lambda o: (DIGIT_SIZE - o.abs()).clamp(min=0).prod(-1)  # noqa: E731
        offset = torch.randint(-27, 28, (m, 2), generator=generator)
        while (bad := overlap(offset) > DIGIT_SIZE**2 // 2).any():  # redraw those over more than half
            offset[bad] = torch.randint(-27, 28, (int(bad.sum()), 2), generator=generator)
        out[intruder] = torch.maximum(out[intruder], _translate(other, offset.float()))
    # blur and dimming, as in soft, grey predictions
    blurred = rand(n) < 0.3
    if blurred.any():
        sigma = 0.5 + rand(1).item() * 0.7
        x = torch.arange(5) - 2.0
        kernel = torch.exp(-x**2 / (2 * sigma**2))
        kernel = (kernel[:, None] * kernel[None]) / kernel.sum() ** 2
        out[blurred] = F.conv2d(out[blurred], kernel[None, None], padding=2)
    dim = rand(n) < 0.3
    out[dim] = out[dim] * (0.5 + rand(int(dim.sum()), 1, 1, 1) * 0.5)
    return out.clamp(0, 1)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size, None].float() / 255
        correct += (model(batch).argmax(-1) == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def main(argv=None) -> None:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist_root", default=None, help="MNIST folder (default: the project's resolution order)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ASSETS))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, val, test = (load_mnist(split, root=args.mnist_root) for split in ("train", "val", "test"))
    print(f"train: {train.source}\ntest: {test.source}")
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    images = train.images[:, None].float() / 255
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            index = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(images[index], generator)), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(train):.4f}, val accuracy "
              f"{accuracy(model, val.images, val.labels):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    test_accuracy, val_accuracy = accuracy(model, test.images, test.labels), accuracy(model, val.images, val.labels)
    print(f"MNIST test accuracy {test_accuracy:.4f} ({len(test)} digits); training {seconds:.0f} s")

    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "digit_classifier.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"format": "pt", "model": "mcvd_diffusers.digit_classifier.DigitClassifier"})
    os.replace(tmp, weights)
    card = {
        "model": "mcvd_diffusers.digit_classifier.DigitClassifier",
        "weights": weights.name,
        "sha256": weights_sha256(weights),
        "size_bytes": weights.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mnist_test_accuracy": round(test_accuracy, 4),
        "mnist_val_accuracy": round(val_accuracy, 4),
        "test_digits": len(test),
        "train_digits": len(train),
        "data_source": train.source,
        "augmentation": "shifts up to 2.5 px, rotation up to 12 degrees, scale 0.9-1.1; p=0.3 each: a second "
                        "digit over at most half of the window, Gaussian blur (sigma 0.5-1.2), dimming to 50-100%",
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "command": " ".join(["python", "scripts/train_digit_classifier.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "training_seconds": round(seconds, 1),
        "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
    }
    (out / "digit_classifier.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {weights} ({card['size_bytes']} bytes) and {out / 'digit_classifier.json'}")


if __name__ == "__main__":
    main()
