"""A training run survives what clusters and users do to it: signals, kills, power loss, corrupt or
edited files, a full disk, and an output_dir that holds something else."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training import _interrupt_data_at, assert_same_run, small_config, uninterrupted  # noqa: F401

from mcvd_diffusers import checkpointing
from mcvd_diffusers.checkpointing import STATE_FILE, list_checkpoints, resolve_checkpoint
from mcvd_diffusers.interrupt import StopOnSignal
from mcvd_diffusers.config import TrainConfig
from mcvd_diffusers.export import export_checkpoint
from mcvd_diffusers.trainer import RUN_MARKER, train

REPO = Path(__file__).resolve().parents[1]

# A 32-px tiny run on the command line, long enough to be signalled while it trains (about 30 steps/s).
CLI_STEPS = 150
CLI_ARGS = ["--preset", "tiny", "--mnist_root", "bundled", "--image_size", "32", "--num_past_frames", "2",
            "--num_current_frames", "3", "--batch_size", "2", "--max_steps", str(CLI_STEPS), "--learning_rate",
            "1e-3", "--lr_scheduler", "constant", "--validate_every", "50", "--val_clips", "8", "--val_batch_size",
            "4", "--sample_every", "0", "--checkpoint_every", "0", "--log_every", "1", "--report_to", "none",
            "--mixed_precision", "no"]  # fp32 on every machine (auto would run bf16 where the CPU has it natively)


def start_training(out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = out.with_suffix(".stderr")
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "train_mcvd.py", *CLI_ARGS, "--output_dir", str(out), *extra],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    return process, log


def wait_for_step(process: subprocess.Popen, log: Path, step: int, timeout: float = 120) -> None:
    """Waits until the progress bar shows at least ``step`` steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [int(n) for n in re.findall(rf"(\d+)/{CLI_STEPS} ", log.read_text())]
        if done and max(done) >= step:
            return
        assert process.poll() is None, f"training ended early:\n{log.read_text()[-2000:]}"
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} within {timeout} s:\n{log.read_text()[-2000:]}")


def signal_run(out: Path, sig: int, after_step: int, *extra: str) -> tuple[int, str]:
    process, log = start_training(out, *extra)
    wait_for_step(process, log, after_step)
    process.send_signal(sig)
    code = process.wait(timeout=120)
    return code, log.read_text()


def test_sigint_then_sigterm_save_checkpoints_and_the_resumed_run_is_bitwise_the_same(tmp_path):
    reference = tmp_path / "reference"
    finished = subprocess.run([sys.executable, "train_mcvd.py", *CLI_ARGS, "--output_dir", str(reference)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]

    out = tmp_path / "run"
    code, stderr = signal_run(out, signal.SIGINT, after_step=5)  # Ctrl-C
    first = int(re.search(r"stopped by SIGINT at step (\d+); saved (\S+)\. Resume with", stderr).group(1))
    assert code == 130 and "Traceback" not in stderr
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"checkpoint-{first}"]

    code, stderr = signal_run(out, signal.SIGTERM, first + 5, "--resume_from_checkpoint", "latest")  # the scheduler
    second = int(re.search(r"stopped by SIGTERM at step (\d+)", stderr).group(1))
    assert code == 143 and "Traceback" not in stderr and first < second < CLI_STEPS
    assert (out / "checkpoints" / f"checkpoint-{second}").is_dir()

    resumed = subprocess.run([sys.executable, "train_mcvd.py", *CLI_ARGS, "--output_dir", str(out),
                              "--resume_from_checkpoint", "latest"], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(reference, out)
    commands = json.loads((out / "pipeline" / "training_info.json").read_text())["commands"]
    assert len(commands) == 3  # the three starts of the run, for the model card


def test_a_second_signal_exits_at_once(tmp_path):
    script = ("import sys, time\nfrom mcvd_diffusers.interrupt import StopOnSignal\n"
              "with StopOnSignal():\n    print('ready', flush=True)\n    time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)  # the first only asks the loop to stop after its step...
    time.sleep(0.5)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)  # ...the second ends the process now
    assert process.wait(timeout=10) == 143
    stderr = process.stderr.read()
    assert "finishing this step and saving a checkpoint" in stderr and "SIGTERM again: exiting now" in stderr


def test_signal_handlers_are_restored_after_training(tmp_path):
    def handlers():
        return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    before, seen = handlers(), []
    import mcvd_diffusers.trainer as trainer

    class Watched(StopOnSignal):  # what the loop installs while it trains
        def __enter__(self):
            stop = super().__enter__()
            seen.append(handlers() == (stop._handle, stop._handle))
            return stop

    original, trainer.StopOnSignal = trainer.StopOnSignal, Watched
    try:
        train(small_config(tmp_path / "run", max_steps=2, validate_every=0, checkpoint_every=0, lr_scheduler="constant"))
    finally:
        trainer.StopOnSignal = original
    assert seen == [True] and handlers() == before


# ----------------------------------------------------------------------- latest, fresh starts
def test_latest_starts_fresh_when_a_run_died_before_its_first_checkpoint(uninterrupted, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "run"
    _interrupt_data_at(monkeypatch, call=2)  # killed during step 2: logs and markers exist, no checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(small_config(out))
    monkeypatch.undo()
    assert list_checkpoints(out / "checkpoints") == [] and any(out.iterdir())
    (out / "best").mkdir()  # what a first validation leaves, and an interrupted save
    (out / "checkpoints" / ".checkpoint-2.partial").mkdir(parents=True)
    train(small_config(out, resume_from_checkpoint="latest"))
    assert "holds no complete checkpoint to resume" in capsys.readouterr().out
    assert_same_run(uninterrupted, out)


# ------------------------------------------------------------------------- durable checkpoints
def _interrupted_at_step_5(out: Path, monkeypatch) -> None:
    _interrupt_data_at(monkeypatch, call=5)  # checkpoints 2 and 4 exist
    with pytest.raises(KeyboardInterrupt):
        train(small_config(out))
    monkeypatch.undo()


def test_power_loss_falls_back_to_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_at_step_5(out, monkeypatch)
    newest = out / "checkpoints" / "checkpoint-4"
    for name in ("model.safetensors", "optimizer.bin"):  # the data never reached the disk: zeroed blocks
        path = newest / name
        path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.warns(UserWarning, match=r"resuming from .*checkpoint-2 instead of the newer checkpoint\(s\) that "
                                         r"failed to load: checkpoint-4: .*model\.safetensors is corrupt"):
        train(small_config(out, resume_from_checkpoint="latest"))
    assert_same_run(uninterrupted, out)


def test_every_file_and_folder_of_a_checkpoint_is_flushed_to_disk(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "run"
    train(small_config(out, max_steps=2, validate_every=2))
    final = out / "checkpoints" / "checkpoint-2"
    flushed = {Path(p).name for p in synced}
    files = {p.name for p in final.iterdir()}
    assert files <= flushed, f"never flushed: {files - flushed}"
    assert ".checkpoint-2.partial" in flushed and "checkpoints" in flushed  # the folder, and the rename


def test_a_prune_killed_half_way_never_leaves_a_complete_looking_checkpoint(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_rmtree = checkpointing.shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        if Path(path).name == "checkpoint-2":
            (Path(path) / "ema.safetensors").unlink()  # half deleted...
            raise KeyboardInterrupt("killed while pruning")  # ...then killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(out, checkpoints_total_limit=1))  # saving checkpoint-4 prunes checkpoint-2
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-4"]
    train(small_config(out, checkpoints_total_limit=1, resume_from_checkpoint="latest"))
    assert not (out / "checkpoints" / "checkpoint-2").exists()  # the half-deleted folder was cleared
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-6"]


def test_a_full_disk_names_the_path_and_the_free_space(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "run"
    real_save = checkpointing.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "ema" in str(filename) and "checkpoint-4" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write .*\.checkpoint-4\.partial: the disk is full or over "
                                      r"quota \([\d.]+ MiB free on "):
        train(small_config(out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]  # intact


def test_torchs_own_write_failure_is_reported_as_a_full_disk(tmp_path):
    from mcvd_diffusers.integrity import explain_disk_full

    with pytest.raises(OSError, match=r"could not write .*: the disk is full or over quota"):
        with explain_disk_full(tmp_path / "x"):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors pass through unchanged
        with explain_disk_full(tmp_path / "x"):
            raise RuntimeError("shape mismatch")


# ------------------------------------------------------------------- checkpoint contents
@pytest.fixture
def finished_run(uninterrupted, tmp_path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    return out


@pytest.mark.parametrize("content, message", [
    ({}, "'step' must be an integer >= 1"),
    ([], "it must be a JSON object, got list"),
    ({"step": "6"}, "'step' must be an integer >= 1"),
])
def test_a_corrupt_trainer_state_is_a_clear_error(finished_run, content, message):
    (finished_run / "checkpoints" / "checkpoint-6" / STATE_FILE).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"checkpoint-6/{STATE_FILE} is not a valid trainer state: {message}"):
        resolve_checkpoint(str(finished_run / "checkpoints" / "checkpoint-6"), finished_run / "checkpoints")


def test_a_trainer_state_of_the_wrong_types_or_step_is_refused(finished_run):
    path = finished_run / "checkpoints" / "checkpoint-6" / STATE_FILE
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "history": {**state["history"], "validations": "many"}}))
    with pytest.raises(ValueError, match=r"'history\.validations' must be a list of \{step, loss\}"):
        export_checkpoint(path.parent, finished_run / "export")
    path.write_text(json.dumps({**state, "step": 4}))  # an edited step
    with pytest.raises(ValueError, match="records step 4, but the folder is checkpoint-6"):
        train(small_config(finished_run, max_steps=8, resume_from_checkpoint=str(path.parent)))


def test_missing_unexpected_and_non_finite_checkpoint_tensors_are_named(finished_run):
    checkpoint = finished_run / "checkpoints" / "checkpoint-6"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))  # no digests
    ema = load_file(checkpoint / "ema.safetensors")
    dropped = sorted(ema)[0]
    save_file({k: v for k, v in ema.items() if k != dropped} | {"extra.weight": torch.zeros(1)},
              checkpoint / "ema.safetensors")
    with pytest.raises(ValueError, match=rf"1 missing tensor\(s\): {re.escape(dropped)}; 1 unexpected tensor\(s\): "
                                         r"extra\.weight"):
        export_checkpoint(checkpoint, finished_run / "export")
    save_file({k: v.fill_(float("nan")) if k == dropped else v for k, v in ema.items()}, checkpoint / "ema.safetensors")
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or inf\) in 1 tensor\(s\): {re.escape(dropped)}"):
        export_checkpoint(checkpoint, finished_run / "export")


# --------------------------------------------------------------------------- output_dir
def test_overwrite_only_ever_deletes_a_run_folder(tmp_path):
    mine = tmp_path / "my-thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    with pytest.raises(ValueError, match=r"not created by mcvd-diffusers training .*it holds: chapter1\.tex\. It is "
                                         "never deleted"):
        train(small_config(mine, overwrite=True))
    assert (mine / "chapter1.tex").read_text() == "months of work"

    run = tmp_path / "run"
    train(small_config(run, max_steps=2))
    assert (run / RUN_MARKER).is_file()
    with pytest.raises(ValueError, match=r"already holds another run \(.*checkpoints/.*\); pass "
                                         "resume_from_checkpoint=latest to continue it, or overwrite=true"):
        train(small_config(run, max_steps=2))
    train(small_config(run, max_steps=4, overwrite=True))  # a run folder may be replaced
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", "inf", "learning_rate must be a finite number, got inf"),
    ("grad_clip", "nan", "grad_clip must be a finite number, got nan"),
    ("bounce", "mirror", "bounce must be one of ('clamp', 'elastic')"),
    ("hub_model_id", "me/my model", "hub_model_id 'me/my model' is not a valid Hub repo id"),
    ("output_dir", "README.md", "output_dir README.md cannot be created: README.md is a file, not a folder"),
])
def test_bad_values_are_refused_on_one_line_before_any_work(key, value, message, run_script):
    code, stderr = run_script("train_mcvd.py", "--config", "configs/tiny.yaml", f"--{key}", value)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if "error:" in line]) == 1
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict({key: value})


def test_a_failed_push_is_one_line_and_keeps_the_export(finished_run):
    result = subprocess.run([sys.executable, "train_mcvd.py", "--push", str(finished_run / "pipeline"),
                             "--hub_model_id", "someone/mcvd"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_token"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: uploading" in result.stderr and "The export is kept" in result.stderr
    assert (finished_run / "pipeline" / "model_index.json").is_file()
