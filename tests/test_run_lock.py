"""A run folder has one owner: a second training or evaluation there is refused in one line with exit code 1,
touching nothing, and a folder whose owner was killed is taken over."""

import os
import signal
import subprocess
import sys

import pytest

import eval_mcvd
import train_mcvd
from mcvd_diffusers.run_lock import RunFolderInUse, hold_run_folder

HOLDER = """
import sys, time
from mcvd_diffusers.run_lock import hold_run_folder
with hold_run_folder(sys.argv[1], "train_mcvd.py"):
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run, as a training run does."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_note.txt").write_text("the first run's files")
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    yield run, process
    process.kill()
    process.wait()


def snapshot(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_a_second_training_in_a_held_folder_is_refused_and_touches_nothing(holder, mnist_dir):
    run, process = holder
    before = snapshot(run)
    with pytest.raises(SystemExit) as stopped:
        train_mcvd.main(["--config", "configs/tiny.yaml", "--output_dir", str(run), "--mnist_root", str(mnist_dir),
                         "--overwrite", "true"])
    message = str(stopped.value.code)
    assert message.count("\n") == 0 and message.startswith("error: ")
    assert f"in use by train_mcvd.py (pid {process.pid} on " in message
    assert snapshot(run) == before  # not even overwrite=true deleted anything


def test_a_second_evaluation_into_a_held_folder_is_refused(holder):
    run, process = holder
    before = snapshot(run)
    with pytest.raises(SystemExit) as stopped:
        eval_mcvd.main(["--model", "checkpoints/mmnist-5to10", "--out", str(run), "--num_clips", "2",
                        "--samplers", "ddim:1", "--mnist_root", "bundled"])
    assert f"(pid {process.pid} on " in str(stopped.value.code)
    assert snapshot(run) == before


def test_the_folder_of_a_killed_run_is_taken_over(holder):
    run, process = holder
    with pytest.raises(RunFolderInUse):
        with hold_run_folder(run, "eval_mcvd.py"):
            pass
    os.kill(process.pid, signal.SIGKILL)  # no clean-up: the system releases its lock
    process.wait()
    with hold_run_folder(run, "train_mcvd.py"):
        with pytest.raises(RunFolderInUse, match=rf"in use by train_mcvd.py \(pid {os.getpid()} "):
            with hold_run_folder(run, "train_mcvd.py"):  # held again, now by this process
                pass
