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
