"""Each benchmark at tiny size on the CPU: it runs, and its JSON holds positive numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench(script, tmp_path, *args):
    out = tmp_path / f"{script}.json"
    result = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args, "--device", "cpu", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["device"].startswith("CPU") and payload["versions"]["torch"]
    return payload, result.stdout


def test_bench_train(tmp_path):
    payload, stdout = bench("bench_train", tmp_path, "--presets", "tiny", "--precisions", "fp32", "bf16",
                            "--batch-size", "2", "--steps", "1", "--fused-adamw")
    assert payload["bf16_matmul_TFLOPs"] > 0
    rows = payload["results"]
    assert [(r["precision"], r["fast_paths"]) for r in rows] == [("fp32", "eager"), ("fp32", "fused_adamw"),
                                                                 ("bf16", "fused_adamw")]
    for row in rows:
        for key in ("step_s", "samples_per_s", "train_GFLOP_per_sample", "achieved_TFLOPs", "mfu",
                    "speedup_vs_fp32_eager", "parameters_M"):
            assert row[key] > 0, key
    # forward + backward is about 3 forward passes of 0.78 GFLOP for the tiny preset
    assert 1.5 < rows[0]["train_GFLOP_per_sample"] < 4
    assert "MFU" in stdout


def test_bench_sample(tmp_path):
    payload, _ = bench("bench_sample", tmp_path, "--samplers", "ddim:2", "dpm++:3", "--batch-sizes", "1", "2")
    rows = payload["results"]
    assert [(r["sampler"], r["batch_size"]) for r in rows] == [("ddim:2", 1), ("ddim:2", 2), ("dpm++:3", 1),
                                                               ("dpm++:3", 2)]
    for row in rows:
        assert row["videos_per_s"] > 0 and row["seconds_per_video"] > 0 and row["peak_memory_GiB"] > 0
        assert row["videos_per_s"] == pytest.approx(1 / row["seconds_per_video"])


def test_bench_data(tmp_path):
    payload, stdout = bench("bench_data", tmp_path, "--batch-sizes", "4", "16", "--train-batch-size", "2")
    assert [r["batch_size"] for r in payload["results"]] == [4, 16]
    assert all(r["sequences_per_s"] > 0 for r in payload["results"])
    assert payload["train_samples_per_s"] > 0 and payload["data_over_train_ratio"] > 0
    assert "x" in stdout.splitlines()[-2]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("bench_train", ["--presets", "huge"], "unknown presets"),
        ("bench_train", ["--precisions", "fp8"], "unknown precision 'fp8'"),
        ("bench_train", ["--precisions", "fp16"], "fp16 mixed precision (with loss scaling) needs a CUDA device"),
        ("bench_sample", ["--samplers", "euler:5"], "unknown sampler 'euler'"),
        ("bench_sample", ["--batch-sizes", "max"], "give numbers on CPU"),
        ("bench_data", ["--preset", "huge"], "unknown preset"),
    ],
)
def test_bad_arguments(script, args, message):
    result = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args, "--device", "cpu"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr


def test_recipe_search_trains_candidates_at_equal_cpu_time(tmp_path):
    out = tmp_path / "search.json"
    result = subprocess.run([sys.executable, "benchmarks/recipe_search.py", "--candidates", "p4-x0", "tiny-v",
                             "--minutes", "0.02", "--val-clips", "2", "--sampler", "ddim:2", "--mnist-root", "bundled",
                             "--out-dir", str(tmp_path / "runs"), "--out", str(out), "--curves",
                             str(tmp_path / "curves.png")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    results = {r["name"]: r for r in payload["results"]}
    assert set(results) == {"p4-x0", "tiny-v"} and payload["copy_last"]["mse"] > 0
    assert results["p4-x0"]["config"]["patch_size"] == 4 and results["tiny-v"]["config"]["preset"] == "tiny"
    for r in results.values():
        assert len(r["curve"]) == 4 and r["curve"][-1]["minutes"] >= 0.02 and r["steps"] >= 1
        assert [p["minutes"] for p in r["curve"]] == sorted(p["minutes"] for p in r["curve"])
    assert (tmp_path / "curves.png").stat().st_size > 0 and "copy-last" in result.stdout


def test_sampler_steps_of_the_shipped_model_on_validation_clips(tmp_path):
    out = tmp_path / "steps.json"
    result = subprocess.run([sys.executable, "benchmarks/bench_sampler_steps.py", "--model",
                             "checkpoints/mmnist-5to10", "--samplers", "ddim:3", "--val-clips", "3", "--samples", "1",
                             "--mnist-root", "bundled", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    copy_last, ddim = json.loads(out.read_text())["rows"]
    assert copy_last["sampler"] == "copy last frame" and ddim["sampler"] == "ddim:3" and ddim["seconds_batch1"] > 0
    assert ddim["mse"] < copy_last["mse"]  # the shipped model predicts, even with 3 steps
