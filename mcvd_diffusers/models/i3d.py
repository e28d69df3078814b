"""I3D, the video network behind the Fréchet Video Distance (FVD), and the loading of its weights.

The network is the RGB Inflated 3D ConvNet of Carreira & Zisserman ("Quo Vadis, Action Recognition?", CVPR 2017):
Inception-v1 (GoogLeNet) with every 2D kernel inflated to 3D, trained on Kinetics-400. FVD (Unterthiner et al.,
2018) runs the TF-Hub module ``deepmind/i3d-kinetics-400/1`` on videos in [-1, 1] at 224x224 and compares the
distributions of its 400 **logits** (pre-softmax, averaged over time). This module rebuilds that network:

- layout and tensor names of the PyTorch port ``pytorch-i3d`` (piergiaj), which the popular PyTorch FVD codes
  (VideoGPT, TATS and, by its README, MCVD's evaluation) load: ``Conv3d_1a_7x7``, ``Conv3d_2b_1x1``, ``Conv3d_2c_3x3``,
  ``Mixed_3b`` .. ``Mixed_5c`` (branches ``b0``, ``b1a``/``b1b``, ``b2a``/``b2b``, ``b3b``; each unit a ``conv3d``
  and a ``bn``) and the 400-way ``logits`` (a 1x1x1 convolution with bias);
- TensorFlow's "SAME" padding (uneven padding goes to the back, as in TF), batch norm with eps 1e-3;
- the head: average pooling 2x7x7 (stride 1, "VALID") over Mixed_5c's map, the 1x1x1 logits convolution,
  then the mean over the remaining time steps. **The FVD feature is this (B, 400) output of ``forward``.**
  ``forward_features`` returns the Mixed_5c map before the head.

The standard input is (B, 3, T, 224, 224) with T >= 9: Mixed_5c's map is then (1024, ceil(T/8), 7, 7) and the
2x7x7 window fits. Smaller inputs also run (the tests use them): the window shrinks to the map, which keeps the
network usable but makes its features incomparable with published FVDs.

Weights (``load_i3d``): VideoGPT's conversion of that TF-Hub module to this layout, ``i3d_pretrained_400.pt`` (a
plain state dict of tensors; MCVD's FVD loads the same file). Weights are read only from safetensors files or from
tensor-only .pt files via ``torch.load(weights_only=True)``; nothing is ever unpickled beyond tensors. They are
found, in order: the ``weights`` argument, the environment variable ``MCVD_I3D_WEIGHTS``, the file in torch's
hub cache ($TORCH_HOME/hub/checkpoints/i3d_pretrained_400.pt), else a download from ``WEIGHTS_URL`` into that
cache, checked against ``WEIGHTS_SHA256`` before it is kept.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 400  # Kinetics-400; the logits are the FVD features
FEATURE_DIM = NUM_CLASSES
STANDARD_SIZE = 224  # frame size I3D was trained at and FVD uses
MIN_FRAMES = 9  # fewest frames for which the standard 2x7x7 head window fits (Mixed_5c has ceil(T/8) >= 2 steps)

WEIGHTS_ENV = "MCVD_I3D_WEIGHTS"
RANDOM_SEED = 0  # load_i3d("random"): the seed of the test network
WEIGHTS_FILE = "i3d_pretrained_400.pt"
# VideoGPT's i3d_pretrained_400.pt, mirrored in a Hugging Face repository at a fixed commit (so the URL cannot
# silently change content). Taken from projects that download it; not fetched when this module was written
# (no network), so WEIGHTS_SHA256 below is still to be pinned.
WEIGHTS_URL = ("https://huggingface.co/spaces/LanguageBind/Open-Sora-Plan-v1.0.0/resolve/"
               "810fa8c4bdb3a4c8eec9bd57375c29bde6fb46de/opensora/eval/fvd/videogpt/i3d_pretrained_400.pt")
# The pinned SHA-256 of the file at WEIGHTS_URL: a download is kept only when its digest equals this. It is None
# until someone with network access has computed it from the file and checked the file's features; while it is
# None there is no automatic download, and the error says how to provide the weights instead.
WEIGHTS_SHA256: str | None = None

# Inception-v1 widths (Szegedy et al. 2015, table 1), by I3D block name:
# (1x1, (3x3 reduce, 3x3), (second 3x3 reduce, second 3x3), pool projection). I3D uses 3x3x3 kernels in the
# second branch where GoogLeNet had 5x5.
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


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME": the output has ceil(size / stride) steps; the odd pixel of padding goes at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[-3:], kernel, stride))):  # F.pad lists the last axis first
        pads.extend(_same_padding(size, k, s))
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Convolution with TF "SAME" padding, then batch norm and ReLU (the logits unit has neither, but a bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
                 *, batch_norm: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not batch_norm)
        # Sonnet's BatchNorm defaults (eps 1e-3), as in the TF original; momentum only matters when training.
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pooling with TF "SAME" padding. Zero padding equals TF's (which ignores padded cells) here, because
    every pooled input in I3D comes out of a ReLU and is >= 0."""

    def __init__(self, kernel: Triple, stride: Triple):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


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
    """Inception-v1 I3D, RGB stream, 400 Kinetics classes: (B, 3, T, H, W) in [-1, 1] -> (B, 400) logits.

    ``I3D()`` is randomly initialized, which is only good for tests; use ``load_i3d`` for the trained network.
    Dropout before the logits is left out: FVD only runs the network in evaluation mode, where it does nothing.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        # Attribute names are the state-dict names of the pytorch-i3d layout, so its weight files load as they are.
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = 192
        stages: list[str] = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3"]
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)), "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2))}
        for name, widths in MIXED_WIDTHS.items():
            if name in pools:  # the stride-2 poolings between Inception stages
                pool_name, kernel = pools[name]
                setattr(self, pool_name, MaxPool3dSame(kernel, (2, 2, 2)))
                stages.append(pool_name)
            block = InceptionBlock(channels, widths)
            setattr(self, name, block)
            stages.append(name)
            channels = block.out_channels
        self.stages = tuple(stages)
        self.logits = Unit3D(channels, num_classes, batch_norm=False, relu=False)
        self._init_random()

    def _init_random(self) -> None:
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
        x = videos
        for name in self.stages:
            x = getattr(self, name)(x)
        return x

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 400) logits (pre-softmax) averaged over time: the FVD features."""
        x = self.forward_features(videos)
        # The standard 2x7x7 window; it shrinks to the map only for inputs below the standard size (see above).
        window = tuple(min(w, size) for w, size in zip(HEAD_WINDOW, x.shape[-3:]))
        x = self.logits(F.avg_pool3d(x, window, stride=1))
        # At 224 px the window leaves 1x1 in space, so this is the original's mean over time.
        return x.mean(dim=(2, 3, 4))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_weights_path() -> Path:
    """Where the downloaded weights live: torch's hub cache, $TORCH_HOME/hub/checkpoints/i3d_pretrained_400.pt."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _how_to_provide(reason: str) -> str:
    return (f"I3D weights for FVD are not available: {reason}. Provide the file {WEIGHTS_FILE} (VideoGPT's "
            f"conversion of TF-Hub's i3d-kinetics-400, {WEIGHTS_URL}) or a .safetensors file with the same tensors "
            f"in one of three ways: (1) pass its path, load_i3d(weights=PATH) or fvd(..., i3d=load_i3d(PATH)); "
            f"(2) set the environment variable {WEIGHTS_ENV}=PATH; (3) put it at {cached_weights_path()} "
            f"(torch's hub cache, under $TORCH_HOME), which is also where a verified download goes.")


def _download_weights() -> Path:
    """Downloads the weights into the hub cache and keeps them only if their SHA-256 is the pinned one."""
    target = cached_weights_path()
    if WEIGHTS_SHA256 is None:
        raise FileNotFoundError(_how_to_provide(
            f"{target} does not exist, and automatic download is off because no SHA-256 is pinned for "
            f"{WEIGHTS_URL} in mcvd_diffusers.models.i3d.WEIGHTS_SHA256 (an unverified file is never used)"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per process: a half-written file never sits under the real name, and two processes
    # downloading at once do not write into each other's file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(partial), progress=True)
    except Exception as e:  # offline machines raise URLError/OSError, HTTP failures HTTPError or RuntimeError
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(_how_to_provide(
            f"{target} does not exist and downloading {WEIGHTS_URL} failed ({type(e).__name__}: {e})")) from e
    digest = _sha256(partial)
    if digest != WEIGHTS_SHA256:
        partial.unlink()
        raise RuntimeError(_how_to_provide(
            f"the file downloaded from {WEIGHTS_URL} has SHA-256 {digest}, not the pinned {WEIGHTS_SHA256}; "
            f"it was deleted"))
    partial.replace(target)
    return target


def resolve_weights(weights: str | os.PathLike | None = None) -> Path:
    """The weights file to load: ``weights``, else $MCVD_I3D_WEIGHTS, else the hub cache, downloading into it if
    needed. A file already in the cache is used as it is: it is either a verified download or one put there."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_how_to_provide(f"the file passed as weights, {path}, does not exist"))
        return path
    from_env = os.environ.get(WEIGHTS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_how_to_provide(f"{WEIGHTS_ENV} names {path}, which does not exist"))
        return path
    cached = cached_weights_path()
    return cached if cached.is_file() else _download_weights()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a .pt state dict read with ``torch.load(weights_only=True)``."""
    path = Path(path)
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


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
    """ValueError naming every tensor ``state`` lacks, has in excess, or has in the wrong shape for ``model``.
    Batch norm's ``num_batches_tracked`` counters are optional: the pytorch-i3d files predate them."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(f"{k} {tuple(given[k])} (expected {tuple(expected[k])})"
                      for k in set(expected) & set(given) if given[k] != expected[k])
    problems = [f"{label}: {_names(keys)}" for label, keys in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", reshaped)) if keys]
    if problems:
        classes = expected["logits.conv3d.bias"][0]
        raise ValueError(f"the tensors of {source} do not fit I3D ({classes} classes, pytorch-i3d names): "
                         + "; ".join(problems))


def load_i3d(weights: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> I3D:
    """The trained I3D in evaluation mode, without gradients.

    ``weights``: a .safetensors or tensor-only .pt file; None looks at $MCVD_I3D_WEIGHTS, then the hub cache,
    then downloads (see the module docstring). ``"random"`` returns a randomly initialized network, for tests only:
    its FVDs mean nothing; it is the same network in every call (a fixed seed), so that its numbers repeat.
    """
    if weights == "random":
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream untouched
            torch.manual_seed(RANDOM_SEED)
            model = I3D()
    else:
        model = I3D()
    if weights != "random":
        path = resolve_weights(weights)
        state = read_state_dict(path)
        check_state_dict(model, state, source=str(path))
        model.load_state_dict(state, strict=False)  # strict=False only for the optional counters checked above
    return model.to(device).eval().requires_grad_(False)
