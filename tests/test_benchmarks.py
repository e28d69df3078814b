"""Each benchmark at tiny size on the CPU: it runs, its JSON holds the expected rows, and each time
it reports is checked against an independent measurement of the same run.

The speed benchmarks run in this process with the work they time instrumented (pipeline calls,
UNet forwards, clip draws, optimizer steps), so a test sees what ran inside each timing: which
sampler with how many network evaluations, under which autocast, with which optimizer. The bounds
on a reported time need no tolerance, so a busy machine cannot break them: a timing that brackets
some work lasts at least as long as that work, and at most from the end of the recorded call before
it to the start of the recorded call after it; a median of such timings lies between the medians
of those bounds. A benchmark that timed the wrong call, ran too few or too many steps, or turned
seconds into a rate or a per-video figure wrongly reports a number outside them.
"""
import inspect
import json
import re
import runpy
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.runtime import bf16_is_native

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SLACK = 1e-6  # seconds: float rounding of perf_counter differences, nothing more


@dataclass
class Call:
    kind: str
    start: float
    end: float
    info: dict = field(default_factory=dict)


class Recorder:
    """Wraps methods so that each call is recorded with its perf_counter interval and a description,
    and runs a benchmark script in this process."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.calls = monkeypatch, []
        self.run_start = self.run_end = None

    def record(self, owner, name, kind, describe=lambda arguments: {}):
        original = getattr(owner, name)
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            info = describe(signature.bind(*args, **kwargs).arguments)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append(Call(kind, start, time.perf_counter(), info))

        self.monkeypatch.setattr(owner, name, wrapper)

    def of(self, kind, start=float("-inf"), end=float("inf")) -> list[Call]:
        """Calls of one kind, in order, that lie within [start, end]."""
        return sorted((c for c in self.calls if c.kind == kind and start <= c.start and c.end <= end),
                      key=lambda c: c.start)

    def bounds(self, start: float, end: float) -> tuple[float, float]:
        """Least and most that a timing bracketing the work from ``start`` to ``end`` can measure: the
        work itself, and the gap between the recorded calls (or the run's ends) around it."""
        before = [c.end for c in self.calls if c.end <= start] + [self.run_start]
        after = [c.start for c in self.calls if c.start >= end] + [self.run_end]
        return end - start, min(after) - max(before)

    def check_median(self, reported: float, intervals: list[tuple[float, float]], what: str) -> None:
        lows, highs = zip(*(self.bounds(a, b) for a, b in intervals))
        low, high = statistics.median(lows), statistics.median(highs)
        assert low - SLACK <= reported <= high + SLACK, (
            f"{what}: reported {reported:.6f} s, but the timed work took at least {low:.6f} s and the gaps "
            f"around it allow at most {high:.6f} s")

    def run(self, script, tmp_path, *args) -> dict:
        """``python benchmarks/<script>.py ARGS --device cpu --out FILE`` in this process; its JSON."""
        out = tmp_path / f"{script}.json"
        self.monkeypatch.chdir(REPO)
        self.monkeypatch.syspath_prepend(str(BENCHMARKS))
        self.monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py", *args, "--device", "cpu", "--out", str(out)])
        _forget_benchmark_modules()  # imported afresh, so that they see the wrapped methods
        self.run_start = time.perf_counter()
        try:
            runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")
        finally:
            self.run_end = time.perf_counter()
            _forget_benchmark_modules()
        payload = json.loads(out.read_text())
        assert payload["device"].startswith("CPU") and payload["versions"]["torch"]
        return payload

    def training_steps(self) -> list[tuple[int, float, float]]:
        """(optimizer id, start, end) of each training step: from the clip draw that opens it to the
        optimizer's zero_grad that closes it."""
        steps = []
        for zero in self.of("zero_grad"):
            previous_end = steps[-1][2] if steps else float("-inf")
            draws = [c for c in self.of("sample", previous_end, zero.start)]
            assert draws, "an optimizer step without a clip drawn for it"
            steps.append((zero.info["optimizer"], draws[-1].start, zero.end))
        return steps

    def record_training(self) -> None:
        self.record(MovingMNIST, "__init__", "data")  # marks where a step's set-up begins
        self.record(MovingMNIST, "sample", "sample", lambda a: {"batch": a["batch_size"], "data": id(a["self"])})
        self.record(MCVDUNet2DModel, "forward", "forward", lambda a: {
            "autocast": torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
            "grad": torch.is_grad_enabled(), "batch": a["sample"].shape[0]})
        self.record(torch.optim.AdamW, "zero_grad", "zero_grad",
                    lambda a: {"optimizer": id(a["self"]), "fused": bool(a["self"].defaults.get("fused"))})


def _forget_benchmark_modules():
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == BENCHMARKS:
            del sys.modules[name]


@pytest.fixture
def recorder(monkeypatch):
    return Recorder(monkeypatch)


def test_bench_train(tmp_path, recorder, capsys):
    recorder.record_training()
    payload = recorder.run("bench_train", tmp_path, "--presets", "tiny", "--precisions", "fp32", "bf16",
                           "--batch-size", "2", "--steps", "1", "--fused-adamw")
    assert payload["matmul_peak_TFLOPs"] > 0
    # the peak MFU divides by is the rate of what this CPU runs natively, never an emulated bf16's
    assert payload["matmul_peak_dtype"] == ("bf16" if bf16_is_native("cpu") else "fp32")
    rows = payload["results"]
    assert [(r["precision"], r["fast_paths"]) for r in rows] == [("fp32", "eager"), ("fp32", "fused_adamw"),
                                                                 ("bf16", "fused_adamw")]
    for row in rows:
        for key in ("step_s", "samples_per_s", "train_GFLOP_per_sample", "achieved_TFLOPs", "mfu",
                    "speedup_vs_fp32_eager"):
            assert row[key] > 0, key
    # forward + backward is about 3 forward passes of the tiny preset's 0.78 GFLOP (0.85 counting attention)
    assert 1.5 < rows[0]["train_GFLOP_per_sample"] < 4
    tiny = sum(p.numel() for p in MCVDUNet2DModel.from_preset("tiny").parameters())
    assert [r["parameters_M"] for r in rows] == [tiny / 1e6] * 3
    assert "MFU" in capsys.readouterr().out

    # Each row has its own optimizer, created in the rows' order; its last step is the timed one
    # (--steps 1), after at least one warm-up step.
    steps = recorder.training_steps()
    optimizers = list(dict.fromkeys(optimizer for optimizer, _, _ in steps))
    assert len(optimizers) == len(rows)
    for row, optimizer in zip(rows, optimizers):
        what = f"{row['precision']} {row['fast_paths']}"
        mine = [(start, end) for opt, start, end in steps if opt == optimizer]
        assert len(mine) >= 2, f"{what}: no warm-up step"
        start, end = mine[-1]
        fused = {c.info["fused"] for c in recorder.of("zero_grad") if c.info["optimizer"] == optimizer}
        assert fused == {row["fast_paths"] == "fused_adamw"}, f"{what}: fused AdamW is {fused}"
        (forward,) = recorder.of("forward", start, end)  # one training forward per step, of the batch
        assert forward.info["grad"] and forward.info["batch"] == row["batch_size"] == 2, what
        assert forward.info["autocast"] == {"bf16": torch.bfloat16, "fp32": None}[row["precision"]], what
        recorder.check_median(row["step_s"], [(start, end)], f"step_s of {what}")
        recorder.check_median(row["batch_size"] / row["samples_per_s"], [(start, end)], f"samples_per_s of {what}")


def test_bench_sample(tmp_path, recorder):
    recorder.record(MCVDPipeline, "__call__", "pipeline", lambda a: {
        "batch": a["past_frames"].shape[0], "steps": a["num_inference_steps"], "frames": a["num_frames"],
        "scheduler": a["self"].scheduler})
    recorder.record(MCVDUNet2DModel, "forward", "forward")
    payload = recorder.run("bench_sample", tmp_path, "--samplers", "ddim:2", "dpm++:3", "--batch-sizes", "1", "2",
                           "--repeats", "1", "--precision", "auto")
    rows = payload["results"]
    # auto as it resolved on this CPU, which the JSON names with its native bf16 support
    assert payload["requested_precision"] == "auto" and isinstance(payload["cpu"], str) and payload["cpu"]
    assert {r["precision"] for r in rows} == {"bf16" if payload["cpu_native_bf16"] else "fp32"}
    assert [(r["sampler"], r["batch_size"]) for r in rows] == [("ddim:2", 1), ("ddim:2", 2), ("dpm++:3", 1),
                                                               ("dpm++:3", 2)]
    for row in rows:
        assert row["videos_per_s"] > 0 and row["seconds_per_video"] > 0 and row["peak_memory_GiB"] > 0

    # The pipeline calls of one row share a scheduler and a batch: warm-up, then the timed call.
    calls = recorder.of("pipeline")
    groups = [list(g) for _, g in groupby(calls, key=lambda c: (id(c.info["scheduler"]), c.info["batch"]))]
    assert len(groups) == len(rows)
    schedulers = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
    for row, group in zip(rows, groups):
        what = f"{row['sampler']} at batch {row['batch_size']}"
        name, steps = row["sampler"].split(":")
        assert len(group) >= 2, f"{what}: no warm-up call"
        timed = group[-1]
        assert type(timed.info["scheduler"]) is schedulers[name], what
        assert (timed.info["batch"], timed.info["steps"], timed.info["frames"]) == (row["batch_size"], int(steps), 10)
        # one video is one block of 10 frames here: one network evaluation per step
        assert len(recorder.of("forward", timed.start, timed.end)) == int(steps), what
        interval = [(timed.start, timed.end)]
        recorder.check_median(row["seconds_per_batch"], interval, f"seconds_per_batch of {what}")
        recorder.check_median(row["seconds_per_video"] * row["batch_size"], interval, f"seconds_per_video of {what}")
        recorder.check_median(row["batch_size"] / row["videos_per_s"], interval, f"videos_per_s of {what}")


def test_bench_data(tmp_path, recorder, capsys):
    recorder.record_training()
    payload = recorder.run("bench_data", tmp_path, "--batch-sizes", "4", "16", "--train-batch-size", "2",
                           "--repeats", "3")
    assert [r["batch_size"] for r in payload["results"]] == [4, 16]
    summary = capsys.readouterr().out.splitlines()[-2]

    # Generation is timed first, on one MovingMNIST: per batch size (then the training batch) a
    # run of draws whose last --repeats are the timed ones.
    first = recorder.of("sample")[0].info["data"]
    draws = [c for c in recorder.of("sample") if c.info["data"] == first]
    groups = [(batch, list(g)) for batch, g in groupby(draws, key=lambda c: c.info["batch"])]
    assert [batch for batch, _ in groups] == [4, 16, 2]
    reported = [r["sequences_per_s"] for r in payload["results"]] + [payload["data_sequences_per_s_at_train_batch"]]
    for (batch, group), rate in zip(groups, reported):
        assert len(group) > 3, f"batch {batch}: no warm-up draw"
        recorder.check_median(batch / rate, [(c.start, c.end) for c in group[-3:]], f"sequences_per_s at {batch}")

    # Then training steps of the preset at the training batch (the median of 3, after a warm-up).
    steps = recorder.training_steps()
    assert len({optimizer for optimizer, _, _ in steps}) == 1 and len(steps) > 3
    for _, start, end in steps:
        (forward,) = recorder.of("forward", start, end)
        assert forward.info["grad"] and forward.info["batch"] == 2 and forward.info["autocast"] is None
    recorder.check_median(2 / payload["train_samples_per_s"], [(s, e) for _, s, e in steps[-3:]],
                          "train_samples_per_s")

    # what the script is for: generation is never the bottleneck, not even for the tiny preset
    # (about 100x faster than a training step on a 2-core CPU; see benchmarks/RESULTS.md)
    assert payload["data_over_train_ratio"] > 1
    match = re.fullmatch(r"at batch 2: generation (\S+) sequences/s vs training \(tiny\) (\S+) samples/s: (\S+)x",
                         summary)
    assert match, summary
    assert [float(match[1]), float(match[2])] == pytest.approx(
        [payload["data_sequences_per_s_at_train_batch"], payload["train_samples_per_s"]], rel=1e-3)
    assert float(match[3]) == pytest.approx(payload["data_over_train_ratio"], abs=0.051)


def test_bench_metrics(tmp_path, recorder):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from mcvd_diffusers.metrics import METRICS, FrameMetrics

    recorder.record(FrameMetrics, "__call__", "score", lambda a: {
        "metrics": a["self"].metrics, "videos": a["prediction"].shape[0], "frames": a["prediction"].shape[1]})
    recorder.record(LearnedPerceptualImagePatchSimilarity, "update", "lpips", lambda a: {
        "frames_channels_last": not a["img1"].is_contiguous(),
        "weights_channels_last": next(a["self"].parameters()).is_contiguous(memory_format=torch.channels_last)})
    payload = recorder.run("bench_metrics", tmp_path, "--videos", "2", "--frames", "3", "--repeats", "2")
    rows = {(r["metric"], r["layout"]): r["seconds_per_video"] for r in payload["results"]}
    lpips = ("lpips_alex", "lpips_vgg")  # compared with torch's default layout
    in_channels_last = (*lpips, "lpips_alex_128")
    assert set(rows) == ({(m, "") for m in METRICS if m not in in_channels_last} | {("all", "")}
                         | {("lpips_alex_128", "channels_last")}
                         | {(m, layout) for m in lpips for layout in ("channels_last", "nchw")})
    # each metric as the library scores it, then all at once: the median of the last 2 of 3 calls, per video
    for name in (*METRICS, "all"):
        wanted = tuple(METRICS) if name == "all" else (name,)
        calls = [c for c in recorder.of("score") if c.info["metrics"] == wanted]
        assert len(calls) == 3 and all(c.info["videos"] == 2 and c.info["frames"] == 3 for c in calls), name
        layout = "channels_last" if name in in_channels_last else ""
        recorder.check_median(rows[name, layout] * 2, [(c.start, c.end) for c in calls[-2:]], name)
    # the library's LPIPS runs frames and weights in channels_last; the comparison rows in torch's default
    # layout, both, 3 calls per network (AlexNet, then VGG)
    updates = recorder.of("lpips")
    layouts = {(c.info["frames_channels_last"], c.info["weights_channels_last"]) for c in updates}
    assert layouts == {(True, True), (False, False)}
    nchw = [c for c in updates if not c.info["frames_channels_last"]]
    assert len(nchw) == 6
    for name, calls in zip(lpips, (nchw[:3], nchw[3:])):
        recorder.check_median(rows[name, "nchw"] * 2, [(c.start, c.end) for c in calls[-2:]], f"{name} nchw")


def test_bench_fvd(tmp_path, recorder):
    from mcvd_diffusers.models.i3d import I3D

    recorder.record(I3D, "forward", "i3d", lambda a: {"videos": a["videos"].shape[0],
                                                      "channels_last": a["videos"].is_contiguous(
                                                          memory_format=torch.channels_last_3d)})
    payload = recorder.run("bench_fvd", tmp_path, "--videos", "2", "--batch-size", "2", "--weights", "random",
                           "--settings", "fp32", "fp32-channels-last")
    rows = {r["setting"]: r for r in payload["results"]}
    assert set(rows) == {"fp32", "fp32-channels-last"}
    assert rows["fp32"]["max_rel_error"] == 0 and rows["fp32-channels-last"]["max_rel_error"] < 1e-4
    for name, row in rows.items():
        assert row["videos_per_s"] == pytest.approx(2 / row["seconds"])
        calls = [c for c in recorder.of("i3d") if c.info["channels_last"] == (name != "fp32")]
        assert len(calls) == 3 and all(c.info["videos"] == 2 for c in calls)  # a warm-up, the timed pass, the check
        recorder.check_median(row["seconds"], [(calls[1].start, calls[1].end)], name)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("bench_train", ["--presets", "huge"], "unknown presets"),
        ("bench_train", ["--precisions", "fp8"], "unknown precision 'fp8'"),
        ("bench_train", ["--precisions", "fp16"], "fp16 mixed precision (with loss scaling) needs a CUDA device"),
        ("bench_sample", ["--samplers", "euler:5"], "unknown sampler 'euler'"),
        ("bench_sample", ["--batch-sizes", "max"], "give numbers on CPU"),
        ("bench_data", ["--preset", "huge"], "unknown preset"),
        ("bench_metrics", ["--videos", "0"], "--videos, --frames and --repeats must be >= 1"),
        ("bench_fvd", ["--settings", "fp8"], "unknown setting(s) fp8"),
    ],
)
def test_bad_arguments(script, args, message, run_script):
    code, stderr = run_script(f"benchmarks/{script}.py", *args, "--device", "cpu")
    assert code == 2 and message in stderr


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
        # auto, as it resolves here: never a bf16 the CPU emulates 20x slower than fp32
        assert r["precision"] == ("bf16" if bf16_is_native("cpu") else "fp32")
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
    for row in (copy_last, ddim):  # scored as eval_mcvd.py scores test clips, digit identity included
        assert 0 < row["lpips_vgg"] < 1 and 0 <= row["digit_f10"] <= 1 and 0 <= row["digit_acc"] <= 1
    assert ddim["digit_acc"] > copy_last["digit_acc"]  # copy-last loses the moving digits' places
