"""scripts/gpu_session.py: what travels to the GPU machine and what comes back must arrive intact.
The LPIPS backbones travel in fp16 (the fp32 files would not fit the call's 64 MiB); results come back
as tar parts of at most 15 MiB (the device returns at most 8 files of 16 MiB)."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcvd_diffusers.metrics import load_lpips

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_session.py"


@pytest.fixture(scope="module")
def session():
    return runpy.run_path(str(SCRIPT))


def test_results_come_back_in_parts_and_unpack_to_the_same_files(session, tmp_path, monkeypatch):
    folder = tmp_path / "made" / "pipeline"
    (folder / "unet").mkdir(parents=True)
    blob = torch.randint(0, 256, (40_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (folder / "unet" / "weights.bin").write_bytes(blob.numpy().tobytes())
    (folder / "model_index.json").write_text('{"_class_name": "MCVDPipeline"}')
    evaluation = tmp_path / "made" / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    pack = session["pack"]
    monkeypatch.setitem(pack.__globals__, "PART_BYTES", 16_384)  # small parts, so that there are several
    parts = pack(folder, "pipeline", out) + pack(evaluation, "eval", out)
    assert [p.name for p in parts[:4]] == [f"pipeline.tar.{i:03d}" for i in range(4)]
    assert max(p.stat().st_size for p in parts) == 16_384
    back = tmp_path / "back"
    subprocess.run([sys.executable, str(SCRIPT), "unpack", str(out), "--to", str(back)], check=True)
    assert (back / "pipeline" / "unet" / "weights.bin").read_bytes() == blob.numpy().tobytes()
    assert (back / "eval" / "metrics.json").read_text() == "{}"
    assert not list(back.glob("*.tar"))

    parts[1].unlink()  # a part that did not come back
    result = subprocess.run([sys.executable, str(SCRIPT), "unpack", str(out), "--to", str(tmp_path / "again")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "expected ['pipeline.tar.000', 'pipeline.tar.001'" in result.stderr


def test_the_fp16_lpips_backbone_scores_like_the_original(session, tmp_path, monkeypatch):
    original = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    small = tmp_path / "alexnet.fp16.safetensors"
    session["shrink_backbone"](original, small)
    assert small.stat().st_size < original.stat().st_size / 1.9  # fp16, classifier zeros as shapes only
    home = tmp_path / "home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    session["restore_backbone"](small, home / "hub" / "checkpoints" / original.name)
    rebuilt = torch.load(home / "hub" / "checkpoints" / original.name, weights_only=True)
    reference = torch.load(original, weights_only=True)
    assert rebuilt.keys() == reference.keys()
    assert all(rebuilt[k].shape == reference[k].shape for k in reference)

    frames = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = frames.roll(3, dims=-1)
    scores = {}
    for name, torch_home in (("original", original.parents[2]), ("fp16", home)):
        monkeypatch.setenv("TORCH_HOME", str(torch_home))
        metric = load_lpips("lpips_alex")
        with torch.no_grad():
            scores[name] = metric(frames.expand(-1, 3, -1, -1), other.expand(-1, 3, -1, -1))
    assert scores["original"].mean() > 0.05  # frames that differ: a score that could move
    assert (scores["fp16"] - scores["original"]).abs().max() < 5e-4


def test_prepare_refuses_missing_data_before_downloading_anything(tmp_path, mnist_dir):
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "prepare", "--mnist_dir", str(empty),
                             "--torch_home", str(Path(torch.hub.get_dir()).parent)], capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.startswith("error: --mnist_dir:")
    assert "train-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, str(SCRIPT), "prepare", "--mnist_dir", str(mnist_dir),
                             "--torch_home", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "LPIPS backbone weights not found" in result.stderr
    assert "vgg16-397923af.pth" in result.stderr


class FakeDevice:
    """Stands in for the commands a train call runs: the probe reports ``step_s``, training stops at its hard
    limit (exit 124) after writing ``checkpoints``, an export writes the pipeline folder it is asked for."""

    def __init__(self, run_dir: Path, step_s: float | None, checkpoints: list[int]):
        self.run_dir, self.step_s, self.checkpoints, self.calls = run_dir, step_s, checkpoints, []

    def __call__(self, command, log, timeout=None, env=None):
        self.calls.append((command, timeout))
        if "benchmarks/bench_train.py" in command and self.step_s is not None:
            out = Path(command[command.index("--out") + 1])
            out.write_text(f'{{"results": [{{"precision": "fp32", "step_s": 9.0}}, '
                           f'{{"precision": "bf16", "step_s": {self.step_s}}}]}}')
        if "train_mcvd.py" in command and "--max_steps" in command:
            for step in self.checkpoints:
                (self.run_dir / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
            return 124
        if "--export" in command:
            pipeline = Path(command[command.index("--to") + 1])
            pipeline.mkdir(parents=True)
            (pipeline / "model_index.json").write_text('{"_class_name": "MCVDPipeline"}')
        return 0


def run_train_stage(session, monkeypatch, tmp_path, fake, *flags):
    monkeypatch.setitem(session["train"].__globals__, "run", fake)  # run_path hands back a copy of the globals
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "train", "--run_dir", str(fake.run_dir), "--num_clips", "0",
                                      *flags, "--export_sampler", "ddim:3"])
    session["main"]()
    return [command for command, _ in fake.calls], dict((tuple(c), t) for c, t in fake.calls)


def test_a_timed_run_gets_its_steps_from_the_probe_and_exports_its_newest_checkpoint_when_stopped(
        session, tmp_path, monkeypatch):
    fake = FakeDevice(tmp_path / "run", step_s=0.05, checkpoints=[600, 1200, 3000])
    commands, timeouts = run_train_stage(session, monkeypatch, tmp_path, fake,
                                         "--minutes", "6.5", "--hard_limit", "300", "--batch_size", "1024")
    probe, training, export = commands
    assert probe[probe.index("--batch-size") + 1] == "1024"  # timed at the run's batch size, not the config's
    assert training[training.index("--max_steps") + 1] == str(int(6.5 * 60 / (0.05 * 1.1)))
    assert 250 < timeouts[tuple(training)] <= 255  # the hard limit less 45 s for the export and the packing
    # checkpoint-3000, not checkpoint-600 (which sorts last as text)
    assert export[export.index("--export") + 1] == str(tmp_path / "run" / "checkpoints" / "checkpoint-3000")
    assert export[export.index("--export_sampler") + 1] == "ddim:3"
    subprocess.run([sys.executable, str(SCRIPT), "unpack", str(tmp_path / "out"), "--to", str(tmp_path / "back")],
                   check=True)  # no eval parts: a call with --num_clips 0
    assert (tmp_path / "back" / "pipeline" / "model_index.json").is_file()


def test_a_probe_that_fails_falls_back_and_a_run_without_checkpoints_brings_nothing_back(
        session, tmp_path, monkeypatch):
    fake = FakeDevice(tmp_path / "run", step_s=None, checkpoints=[])
    commands, _ = run_train_stage(session, monkeypatch, tmp_path, fake, "--minutes", "2", "--seconds_per_step", "0.2")
    assert len(commands) == 2
    assert commands[1][commands[1].index("--max_steps") + 1] == str(int(2 * 60 / (0.2 * 1.1)))
    assert "training failed" in (tmp_path / "out" / "train.log").read_text()
    assert not list((tmp_path / "out").glob("*.tar.*"))


@pytest.mark.parametrize("flags, message", [
    (["--minutes", "0"], "--minutes: must be greater than 0"),
    (["--minutes", "5", "--hard_limit", "30"], "--hard_limit: must be greater than 45"),
    (["--minutes", "5", "--batch_sise", "8"], "unknown config keys ['batch_sise']"),
    (["--minutes", "5", "--export_sampler", "ddim"], "needs a step count"),
])
def test_a_bad_train_call_is_refused_before_anything_runs(session, tmp_path, monkeypatch, capsys, flags, message):
    fake = FakeDevice(tmp_path / "run", step_s=0.05, checkpoints=[])
    monkeypatch.setitem(session["train"].__globals__, "run", fake)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "train", "--run_dir", str(fake.run_dir), *flags])
    with pytest.raises(SystemExit) as exit_:
        session["main"]()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert fake.calls == []  # no probe, no training: no device time spent
