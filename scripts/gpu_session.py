"""The GPU session's calls (benchmarks/RESULTS.md's GPU rows, a GPU-trained model), each one whole call
of the `device` tool, plus the steps here that prepare and unpack them.

  here, once:  python scripts/gpu_session.py prepare
  each call:   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                   --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
               python3 scripts/gpu_session.py bench                     (call 1, ~6 min)
                   carry [".whl", ".devdata/mnist"]
               python3 scripts/gpu_session.py train --minutes M --hard_limit S --num_clips 0 ...
                   (call 2: train for about M minutes, steps from a timed probe, stopped S seconds after the
                   stage starts at the latest; train_mcvd.py flags follow; --num_clips 0 leaves the evaluation
                   to the CPU here) carry [".whl", ".devdata/mnist"] (and a warm start's folder, if any):
                   53.6 MiB with the general model's shards moved out of the repository for the call
  here, after: python scripts/gpu_session.py unpack FILES_AT            (the folder the call's files came back to)

Why it is shaped like this (the limits of the workplace's `device` tool): only the repository
travels (64 MiB with what is carried), so `prepare` puts the wheels the device image lacks (diffusers,
datasets and their missing dependencies, lpips) in .whl/ and the data in .devdata/: MNIST, and the LPIPS
backbones' conv weights in fp16 (the files here are 68 MB in fp32; fp16 moves LPIPS by at most 2e-4 per
frame and 5e-5 on a mean, measured on 160 frame pairs, below the 3 decimals reported). At most 8 files
of 16 MiB come back, so `train` packs the exported pipeline and the evaluation into tar parts of 15 MiB.
Checked on a CPU with `--smoke`; the train stage ran twice on an H200 (benchmarks/RESULTS.md, "GPU").
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS, DATA = REPO / ".whl", REPO / ".devdata"
TRAVEL_LIMIT = 64 * 2**20
PART_BYTES = 15 * 2**20
# Missing from the device image (KINDS.md's package list) and needed here; versions as tested on the CPU.
DEVICE_WHEELS = ["diffusers==0.42.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "lpips==0.1.4",
                 "importlib_metadata==10.2.0", "lazy-importer==0.1.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
EXPORT_SECONDS = 45  # what --hard_limit keeps back for exporting and packing the last checkpoint
LPIPS_FILES = ("alexnet-owt-7be5be79.pth", "vgg16-397923af.pth")


def run(command: list[str], log, timeout: float | None = None, env: dict | None = None) -> int:
    """Runs one step, its output appended to ``log``; a step that fails or times out does not stop the call
    (the other steps' results still come back), its exit status is logged."""
    log.write(f"\n$ {shlex.join(command)}\n")
    log.flush()
    started = time.perf_counter()
    try:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}).returncode
    except subprocess.TimeoutExpired:
        code = 124
    log.write(f"[exit {code} after {time.perf_counter() - started:.0f} s]\n")
    log.flush()
    return code


def travelling_bytes() -> int:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / p for p in tracked.decode().split("\0") if p]
    files += [p for folder in (WHEELS, DATA) for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.is_file())


def shrink_backbone(source: Path, destination: Path) -> None:
    """torchvision's .pth -> safetensors in fp16; the all-zero tensors (the classifier layers, which LPIPS
    never uses, are stored as zeros here) are kept as their shapes only."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(source, weights_only=True)
    zeros = {k: v for k, v in state.items() if not v.any()}
    save_file({k: v.half().contiguous() for k, v in state.items() if k not in zeros}, destination,
              metadata={k: ",".join(map(str, v.shape)) for k, v in zeros.items()})


def restore_backbone(source: Path, destination: Path) -> None:
    """The inverse of shrink_backbone, as the .pth torchvision loads (fp32; zeros as expanded views)."""
    import torch
    from safetensors import safe_open

    with safe_open(source, "pt") as f:
        state = {k: f.get_tensor(k).float() for k in f.keys()}
        shapes = f.metadata() or {}
    state.update({k: torch.zeros(()).expand(*map(int, s.split(","))) for k, s in shapes.items()})
    torch.save(state, destination)


def check_inputs(mnist_dir: Path, torch_home: Path) -> list[Path]:
    """The files prepare copies, checked before anything is downloaded or written (clear errors)."""
    from mcvd_diffusers.data.mnist import IDX_FILES, load_mnist

    for split in ("train", "test"):
        try:
            load_mnist(split, root=mnist_dir, download=False)
        except (OSError, ValueError) as e:  # names the missing or corrupt file
            raise SystemExit(f"error: --mnist_dir: {e}") from None
    backbones = [torch_home / "hub" / "checkpoints" / name for name in LPIPS_FILES]
    missing = [str(p) for p in backbones if not p.is_file()]
    if missing:
        raise SystemExit(f"error: LPIPS backbone weights not found: {missing} (--torch_home is the TORCH_HOME "
                         "that holds hub/checkpoints/)")
    mnist = [p for p in sorted(mnist_dir.iterdir()) if p.name.removesuffix(".gz") in IDX_FILES.values()]
    return mnist + backbones


def prepare(args) -> None:
    files = check_inputs(Path(args.mnist_dir), Path(args.torch_home))
    WHEELS.mkdir(exist_ok=True)
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *DEVICE_WHEELS], check=True)
    (DATA / "mnist").mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.name in LPIPS_FILES:
            shrink_backbone(path, DATA / f"{path.name}.fp16.safetensors")
        else:
            shutil.copyfile(path, DATA / "mnist" / path.name)
    size = travelling_bytes()
    print(f"prepared .whl/ and .devdata/; the call's working tree: {size / 2**20:.1f} MiB of {TRAVEL_LIMIT >> 20}")
    if size > TRAVEL_LIMIT:
        print("over the limit: the shipped checkpoint's shards travel too; move checkpoints/mmnist-5to10/unet/"
              "*.safetensors out of the repository for the calls and back afterwards (git status shows it)")


def torch_home() -> str:
    """Rebuilds torchvision's LPIPS backbone files from .devdata (on the device) and returns a TORCH_HOME."""
    home = Path("/tmp/mcvd_torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in LPIPS_FILES:
        restore_backbone(DATA / f"{name}.fp16.safetensors", home / "hub" / "checkpoints" / name)
    return str(home)


def out_dir() -> Path:
    out = Path(os.environ.get("OUT") or REPO / "runs" / "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def pack(folder: Path, name: str, out: Path) -> list[Path]:
    """One tar of ``folder`` split into parts of at most 15 MiB: NAME.tar.000, NAME.tar.001, ..."""
    archive = out / f"{name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=name)
    data, parts = archive.read_bytes(), []
    archive.unlink()
    for i in range(0, len(data), PART_BYTES):
        parts.append(out / f"{name}.tar.{i // PART_BYTES:03d}")
        parts[-1].write_bytes(data[i:i + PART_BYTES])
    return parts


def bench(args) -> None:
    out, py = out_dir(), sys.executable
    device = "cpu" if args.smoke else "cuda"
    batch, steps = (["8"], "1") if args.smoke else (["256"], "10")
    env = {"MCVD_MNIST_DIR": str(DATA / "mnist")}
    with open(out / "bench.log", "a") as log:
        run([py, "benchmarks/bench_train.py", "--presets", *(["tiny"] if args.smoke else ["cpu", "fast", "paper"]),
             "--precisions", "fp32", "bf16", "--batch-size", *batch, "--steps", steps, "--channels-last",
             "--fused-adamw", *([] if args.smoke else ["--compile"]), "--device", device,
             "--out", str(out / "train_gpu.json")], log, timeout=args.step_timeout, env=env)
        for preset, precision, compile_ in (("cpu", "bf16", True), ("paper", "fp32", False), ("paper", "bf16", True)):
            if args.smoke and preset == "paper":
                continue
            run([py, "benchmarks/bench_sample.py", "--preset", preset, "--samplers", "dpm++:20", "ddim:20",
                 "--batch-sizes", "1", *(["8"] if args.smoke else ["max"]), "--precision", precision,
                 *(["--compile"] if compile_ and not args.smoke else []), "--device", device,
                 "--out", str(out / f"sample_gpu_{preset}_{precision}.json")], log, timeout=args.step_timeout, env=env)
        run([py, "benchmarks/bench_data.py", "--device", device, *(["--batch-sizes", "16"] if args.smoke else []),
             "--out", str(out / "data_gpu.json")], log, timeout=args.step_timeout, env=env)


def run_config(config_file: str, flags: list[str]):
    """The TrainConfig the call's train_mcvd.py will run: the config file with the flags over it, parsed and
    validated as train_mcvd.py does, so that a bad flag is refused before any device time is spent."""
    from mcvd_diffusers.cli import FlagParser, add_config_flags, given_values, refuse_unknown_flags
    from mcvd_diffusers.config import TrainConfig, load_config_file

    parser = FlagParser(prog="gpu_session.py train (train_mcvd.py flags)")
    add_config_flags(parser, TrainConfig)
    refuse_unknown_flags(parser, flags, TrainConfig)
    options = given_values(parser.parse_args(flags), TrainConfig)
    try:
        return TrainConfig.from_dict({**load_config_file(REPO / config_file), **options})  # train_mcvd.py runs in REPO
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def steps_for(minutes: float, config, args, out: Path, log) -> int:
    """How many steps fit in ``minutes``: one training step of the run's preset at its batch size is timed by
    bench_train.py (its fast paths, bf16; this is also the call's training benchmark), plus 10% for logging,
    validation and checkpoints. A probe that fails falls back to --seconds_per_step."""
    import json

    probe = out / "train_gpu_probe.json"
    run([sys.executable, "benchmarks/bench_train.py", "--presets", config.preset, "--precisions", "bf16",
         "--batch-size", str(config.batch_size), "--steps", "20", "--channels-last", "--fused-adamw",
         "--device", "cpu" if args.smoke else "cuda", "--out", str(probe)], log, timeout=180)
    try:
        rows = json.loads(probe.read_text())["results"]
        seconds = [r["step_s"] for r in rows if r["precision"] == "bf16"][-1]
    except (OSError, ValueError, KeyError, IndexError):
        seconds = args.seconds_per_step
    steps = max(1, int(minutes * 60 / (seconds * 1.1)))
    log.write(f"{seconds * 1000:.1f} ms a step at batch {config.batch_size}: {steps} steps in {minutes} min\n")
    return steps


def train(args, extra: list[str]) -> None:
    out, py = out_dir(), sys.executable
    run_dir = Path(args.run_dir or (REPO / "runs" / "gpu_smoke_run" if args.smoke else "/tmp/mcvd_gpu_run"))
    env = {"MCVD_MNIST_DIR": str(DATA / "mnist")}
    started = time.perf_counter()
    config = run_config(args.config, extra)
    with open(out / "train.log", "a") as log:
        max_steps = args.max_steps or steps_for(args.minutes, config, args, out, log)
        # --hard_limit stops training in time for the last checkpoint to be exported and packed before the
        # device call's own limit (which would bring nothing back)
        limit = args.hard_limit - (time.perf_counter() - started) - EXPORT_SECONDS if args.hard_limit else None
        code = run([py, "train_mcvd.py", "--config", args.config, "--output_dir", str(run_dir), "--overwrite", "true",
                    "--max_steps", str(max_steps), "--report_to", "none", *extra], log, timeout=limit, env=env)
        pipeline = run_dir / "pipeline"
        if code != 0 or not pipeline.is_dir():
            checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
            if not checkpoints:
                log.write("no exported pipeline and no checkpoint: training failed, see above\n")
                return
            shutil.rmtree(pipeline, ignore_errors=True)
            run([py, "train_mcvd.py", "--export", str(checkpoints[-1]), "--to", str(pipeline),
                 "--export_sampler", str(config.export_sampler)], log, env=env)
        if (run_dir / "train_summary.json").is_file():
            shutil.copyfile(run_dir / "train_summary.json", out / "train_summary.json")
        if args.num_clips:
            env["TORCH_HOME"] = torch_home()
            evaluation = run_dir / "eval"
            run([py, "eval_mcvd.py", "--model", str(pipeline), "--samplers", "shipped", *args.samplers,
                 "--num_clips", str(args.num_clips), "--samples_per_clip", str(args.samples_per_clip),
                 "--batch_size", str(args.eval_batch_size), "--out", str(evaluation), "--update_model_card"],
                log, env=env)
        pack(pipeline, "pipeline", out)  # after the evaluation, which writes its table into the model card
        if args.num_clips and evaluation.is_dir():
            shutil.rmtree(evaluation / "cache", ignore_errors=True)
            pack(evaluation, "eval", out)


def unpack(args) -> None:
    """Joins the tar parts a call brought back and extracts them under ``--to`` (pipeline/, eval/)."""
    source, target = Path(args.files_at), Path(args.to)
    for name in ("pipeline", "eval"):
        parts = sorted(source.rglob(f"{name}.tar.[0-9][0-9][0-9]"))
        if not parts and name == "eval":
            continue  # a call run with --num_clips 0
        if not parts:
            raise SystemExit(f"error: no {name}.tar.NNN parts under {source}")
        expected = [f"{name}.tar.{i:03d}" for i in range(len(parts))]
        if [p.name for p in parts] != expected:
            raise SystemExit(f"error: {name}'s parts are {[p.name for p in parts]}, expected {expected}")
        joined = target / f"{name}.tar"
        target.mkdir(parents=True, exist_ok=True)
        joined.write_bytes(b"".join(p.read_bytes() for p in parts))
        with tarfile.open(joined) as tar:
            tar.extractall(target, filter="data")
        joined.unlink()
        print(f"{name}: {target / name}")


def above(bound: float, kind=float):
    """An argparse type: a number greater than ``bound``."""
    def parse(text: str):
        value = kind(text)
        if not value > bound:
            raise argparse.ArgumentTypeError(f"must be greater than {bound}, got {text}")
        return value
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    p = stages.add_parser("prepare", help="here: wheels into .whl/, data into .devdata/")
    p.add_argument("--mnist_dir", default=os.environ.get("MCVD_MNIST_DIR", "../shared/data/mnist"))
    p.add_argument("--torch_home", default=os.environ.get("TORCH_HOME", "../shared/data/torch"))
    p = stages.add_parser("bench", help="device call 1: the training, sampling and data benchmarks")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the call itself")
    p.add_argument("--step_timeout", type=float, default=170)
    p = stages.add_parser("train", help="device call 2: train, export, evaluate (extra flags go to train_mcvd.py)")
    p.add_argument("--config", default="configs/cpu.yaml")
    steps = p.add_mutually_exclusive_group(required=True)
    steps.add_argument("--max_steps", type=above(0, int))
    steps.add_argument("--minutes", type=above(0), help="train for about this long: max_steps from a timed probe")
    p.add_argument("--seconds_per_step", type=above(0), default=0.1, help="--minutes' fallback if the probe fails")
    p.add_argument("--hard_limit", type=above(EXPORT_SECONDS), help="seconds for the whole stage: training is "
                   f"stopped {EXPORT_SECONDS} s before it and its last checkpoint exported")
    p.add_argument("--samplers", nargs="+", default=["ddpm:1000", "ddim:50", "dpm++:20"])
    p.add_argument("--num_clips", type=int, default=256, help="0: no evaluation there (evaluate here instead)")
    p.add_argument("--samples_per_clip", type=int, default=10)
    p.add_argument("--eval_batch_size", type=int, default=640)
    p.add_argument("--smoke", action="store_true", help="a run in runs/gpu_smoke_run on the CPU, to check the call")
    p.add_argument("--run_dir", help="the run's folder (default /tmp/mcvd_gpu_run; with --smoke runs/gpu_smoke_run)")
    p = stages.add_parser("unpack", help="here: join and extract the parts a train call brought back")
    p.add_argument("files_at")
    p.add_argument("--to", default="runs/gpu")
    args, extra = parser.parse_known_args()
    if extra and args.stage != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    {"prepare": prepare, "bench": bench, "unpack": unpack}.get(args.stage, lambda a: train(a, extra))(args)


if __name__ == "__main__":
    main()
