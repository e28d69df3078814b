import os
from pathlib import Path

import pytest
import torch

from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel, make_noise_scheduler

# ../shared/data beside the repository holds what downloads would bring (MNIST, LPIPS weights).
SHARED_DATA = Path(os.environ.get("MCVD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

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
