import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel, make_noise_scheduler

# ../shared/data beside the repository holds what downloads would bring (MNIST, LPIPS weights).
SHARED_DATA = Path(os.environ.get("MCVD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Tests never read the user's cache or MNIST folder, and never download."""
    os.environ["MCVD_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("MCVD_MNIST_DIR", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TORCH_HOME"] = str(SHARED_DATA / "torch")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state (its mixed precision among it); tests that train with
    different settings in one process need it cleared, as Accelerate's own tests do."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def run_script(monkeypatch, capsys):
    """Runs a command-line script of the repository in this process, as `python SCRIPT ARGS` would (from the
    repository, the script's folder first on sys.path), and returns its exit code and stderr. For commands that
    must stop before any work: a fresh interpreter would spend ~8 s importing torch and diffusers each time."""
    def run(script: str, *args: str) -> tuple[int, str]:
        path = REPO / script
        monkeypatch.chdir(REPO)
        monkeypatch.syspath_prepend(str(path.parent))
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(path), run_name="__main__")
        code, err = stopped.value.code, capsys.readouterr().err
        if isinstance(code, str):  # sys.exit("message"): the interpreter would print it and exit with 1
            return 1, err + code
        return code or 0, err
    return run


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    folder = SHARED_DATA / "mnist"
    if not folder.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{folder} is missing: CI needs ../shared/data beside the repository")
        pytest.skip(f"{folder} not found (set MCVD_SHARED_DATA to the folder holding mnist/)")
    return folder


def make_tiny_pipeline(seed: int = 0, **overrides) -> MCVDPipeline:
    """An untrained 32-px model: fast enough to run every scheduler in the tests."""
    torch.manual_seed(seed)
    layout = dict(sample_size=32, num_past_frames=2, num_current_frames=3)
    unet = MCVDUNet2DModel.from_preset("tiny", **{**layout, **overrides})
    pipe = MCVDPipeline(unet=unet, scheduler=make_noise_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe() -> MCVDPipeline:
    return make_tiny_pipeline()
