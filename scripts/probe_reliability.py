"""Probes a training run the way a cluster and a careless afternoon would, and prints the figures.

1. Kills: a small run on the command line is killed at random moments (SIGKILL, SIGTERM or SIGINT, in
   turn) and resumed with ``--resume_from_checkpoint latest`` until it finishes; its final weights are
   compared bitwise with an uninterrupted run, and every checkpoint that was complete before a kill
   must still be complete after it.
2. Corrupt files: damage done to a finished run's checkpoint and exported pipeline; each must give a
   clear error (ValueError/FileNotFoundError/OSError naming a path) or be recovered from.
3. Bad values: command lines that must be refused in one line, before any work, with no traceback.

usage: python scripts/probe_reliability.py [--kills 12] [--out runs/probe] [--seed 0]
Writes ``--out``/probe.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers import MCVDPipeline  # noqa: E402
from mcvd_diffusers.checkpointing import STATE_FILE, list_checkpoints, verify_checkpoint  # noqa: E402
from mcvd_diffusers.export import export_checkpoint  # noqa: E402

STEPS = 600
ARGS = ["--preset", "tiny", "--mnist_root", "bundled", "--image_size", "32", "--num_past_frames", "2",
        "--num_current_frames", "3", "--batch_size", "2", "--max_steps", str(STEPS), "--learning_rate", "1e-3",
        "--lr_scheduler", "constant", "--validate_every", "25", "--val_clips", "8", "--val_batch_size", "4",
        "--sample_every", "0", "--checkpoint_every", "10", "--checkpoints_total_limit", "null", "--log_every", "5",
        "--report_to", "none"]


def train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train_mcvd.py", *ARGS, "--output_dir", str(out), *extra]


def weights(out: Path) -> dict[str, torch.Tensor]:
    final = list_checkpoints(out / "checkpoints")[-1]
    found = {f"model.{k}": v for k, v in load_file(final / "model.safetensors").items()}
    found.update({f"ema.{k}": v for k, v in load_file(final / "ema.safetensors").items()})
    for shard in sorted((out / "pipeline" / "unet").glob("*.safetensors")):
        found.update({f"export.{k}": v for k, v in load_file(shard).items()})
    return found


def complete(out: Path) -> set[str]:
    return {p.name for p in list_checkpoints(out / "checkpoints")}


def probe_kills(root: Path, kills: int, rng: random.Random) -> dict:
    reference = root / "reference"
    started = time.perf_counter()
    subprocess.run(train_command(reference), cwd=REPO, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    out, signals = root / "killed", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
    done, lost, events = 0, 0, []
    while True:
        before = complete(out)
        process = subprocess.Popen(train_command(out, "--resume_from_checkpoint", "latest"), cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        sent = None
        if done < kills:
            time.sleep(rng.uniform(0.05, 0.25) * seconds)  # start-up included: kills land anywhere
            if process.poll() is None:
                sent = signals[done % len(signals)]
                process.send_signal(sent)
                done += 1
        stderr = process.communicate(timeout=600)[1]
        after = complete(out)
        missing = sorted(before - after)
        broken = [name for name in after if _fails(out / "checkpoints" / name)]
        lost += len(missing) + len(broken)
        events.append({"signal": sent.name if sent else None, "exit_code": process.returncode,
                       "checkpoints_after": len(after), "lost": missing + broken,
                       "traceback": "Traceback" in stderr})
        if process.returncode == 0:
            break
    a, b = weights(reference), weights(out)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"kills": done, "survived": done if same else 0, "bitwise_equal": same, "checkpoints_lost": lost,
            "tracebacks": sum(e["traceback"] for e in events if e["signal"] in ("SIGTERM", "SIGINT")),
            "events": events, "reference_seconds": seconds}


def _fails(checkpoint: Path) -> bool:
    try:
        verify_checkpoint(checkpoint)
        return False
    except Exception:
        return True


def _zero(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))


def _drop_tensor(path: Path) -> None:
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != sorted(tensors)[0]}, path)


def probe_corruption(root: Path) -> list[dict]:
    run = root / "reference"
    last = list_checkpoints(run / "checkpoints")[-1]
    state = json.loads((last / STATE_FILE).read_text())
    cases = {
        "checkpoint: model.safetensors zeroed": ("ckpt", lambda c: _zero(c / "model.safetensors")),
        "checkpoint: ema.safetensors truncated": ("ckpt", lambda c: (c / "ema.safetensors").write_bytes(
            (c / "ema.safetensors").read_bytes()[:500])),
        "checkpoint: ema.safetensors byte flipped": ("ckpt", lambda c: _flip(c / "ema.safetensors")),
        "checkpoint: optimizer.bin deleted": ("ckpt", lambda c: (c / "optimizer.bin").unlink()),
        "checkpoint: trainer_state.json not JSON": ("ckpt", lambda c: (c / STATE_FILE).write_text("{")),
        "checkpoint: trainer_state.json {}": ("ckpt", lambda c: (c / STATE_FILE).write_text("{}")),
        "checkpoint: trainer_state.json wrong types": ("ckpt", lambda c: (c / STATE_FILE).write_text(
            json.dumps({**state, "history": []}))),
        "checkpoint: step edited": ("ckpt", lambda c: (c / STATE_FILE).write_text(
            json.dumps({**state, "step": state["step"] - 1}))),
        "pipeline: weight shard zeroed": ("pipe", lambda p: _zero(sorted((p / "unet").glob("*.safetensors"))[0])),
        "pipeline: byte flipped (NaN)": ("pipe", lambda p: _flip(sorted((p / "unet").glob("*.safetensors"))[0])),
        "pipeline: tensor removed": ("pipe", lambda p: _drop_tensor(sorted((p / "unet").glob("*.safetensors"))[0])),
        "pipeline: tensor removed, checksums.json deleted": ("pipe", lambda p: (
            _drop_tensor(sorted((p / "unet").glob("*.safetensors"))[0]), (p / "checksums.json").unlink())),
        "pipeline: byte flipped, checksums.json deleted": ("pipe", lambda p: (
            _flip(sorted((p / "unet").glob("*.safetensors"))[0]), (p / "checksums.json").unlink())),
        "pipeline: unet/config.json deleted": ("pipe", lambda p: (p / "unet" / "config.json").unlink()),
    }
    results = []
    for name, (kind, damage) in cases.items():
        copy = root / "corrupt" / name.replace(" ", "_").replace(":", "").replace("/", "_")
        shutil.rmtree(copy, ignore_errors=True)
        source = last if kind == "ckpt" else run / "pipeline"
        shutil.copytree(source, copy / last.name if kind == "ckpt" else copy)
        target = copy / last.name if kind == "ckpt" else copy
        damage(target)
        try:
            if kind == "ckpt":
                export_checkpoint(target, copy / "export")
            else:
                MCVDPipeline.from_pretrained(target)
            outcome, message = "accepted silently", ""
        except (ValueError, FileNotFoundError, OSError) as e:
            outcome, message = ("clear error" if str(copy) in str(e) else "error without the path"), str(e)
        except Exception as e:  # noqa: BLE001 - what the probe is looking for
            outcome, message = f"raw {type(e).__name__}", str(e)
        results.append({"case": name, "outcome": outcome, "message": message[:300]})
    return results


BAD_VALUES = [
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--learning_rate", "inf"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--learning_rate", "nan"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--batch_size", "0"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--batch_size", "two"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--output_dir", "README.md"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--hub_model_id", "me/my model"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--push_to_hub", "true"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--image_size", "30"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--sample_sampler", "euler:20"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--resume_from_checkpoint", "runs/nowhere"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--mixed_precision", "fp16"],
    ["train_mcvd.py", "--config", "configs/tiny.yaml", "--lr", "1e-3"],
    ["eval_mcvd.py", "--model", "checkpoints/mmnist-5to10", "--out", "runs/x", "--device", "gpu"],
    ["eval_mcvd.py", "--model", "checkpoints/mmnist-5to10", "--out", "runs/x", "--device", "cuda"],
    ["eval_mcvd.py", "--model", "checkpoints/mmnist-5to10", "--out", "runs/x", "--samplers", "ddim:0"],
    ["eval_mcvd.py", "--model", "checkpoints/mmnist-5to10", "--out", "runs/x", "--num_clips", "0"],
    ["eval_mcvd.py", "--model", "checkpoints/mmnist-5to10", "--out", "runs/x", "--precision", "fp8"],
    ["eval_mcvd.py", "--model", "nowhere/at/all", "--out", "runs/x"],
]


def probe_bad_values() -> list[dict]:
    results = []
    for args in BAD_VALUES:
        result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        clean = result.returncode != 0 and "Traceback" not in result.stderr and len(errors) == 1
        results.append({"command": " ".join(args), "exit_code": result.returncode, "clean": clean,
                        "message": errors[-1][:300] if errors else result.stderr[-300:]})
    return results


def main() -> None:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--out", default="runs/probe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    kills = probe_kills(root, args.kills, random.Random(args.seed))
    corrupt = probe_corruption(root)
    bad = probe_bad_values()
    report = {"kills": kills, "corrupt_files": corrupt, "bad_values": bad}
    (root / "probe.json").write_text(json.dumps(report, indent=2))
    clear = sum(c["outcome"] == "clear error" for c in corrupt)
    print(f"kills survived {kills['survived']}/{kills['kills']} (bitwise equal to an uninterrupted run: "
          f"{kills['bitwise_equal']}), checkpoints lost {kills['checkpoints_lost']}, tracebacks on SIGTERM/SIGINT "
          f"{kills['tracebacks']}")
    print(f"corrupt files with a clear error {clear}/{len(corrupt)}")
    for c in corrupt:
        if c["outcome"] != "clear error":
            print(f"  {c['case']}: {c['outcome']} {c['message'][:120]}")
    print(f"bad values refused cleanly {sum(b['clean'] for b in bad)}/{len(bad)}")
    for b in bad:
        if not b["clean"]:
            print(f"  {b['command']}: exit {b['exit_code']}: {b['message'][:160]}")
    print(f"written {root / 'probe.json'}")


if __name__ == "__main__":
    main()
