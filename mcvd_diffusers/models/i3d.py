"""I3D (Carreira & Zisserman 2017; RGB, Kinetics-400), the network behind FVD, and the loading of its weights.

Layout and tensor names follow pytorch-i3d (piergiaj), so VideoGPT's ``i3d_pretrained_400.pt`` (TF-Hub's
``deepmind/i3d-kinetics-400/1`` converted; MCVD's FVD loads it too) loads as it is. The standard input is
(B, 3, T >= 9, 224, 224) in [-1, 1]; smaller inputs run (tests) with the head window shrunk to the map, but their
features are not comparable with published FVDs. Weights are read as tensors only, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    # A name per process: a half-written file never sits under the real name, nor in another process's download.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(partial), progress=True)
    except Exception as e:  # offline machines raise URLError/OSError, HTTP failures HTTPError or RuntimeError
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(_how_to_provide(
            f"{target} does not exist and downloading {WEIGHTS_URL} failed ({type(e).__name__}: {e})")) from e
    digest = sha256_file(partial)
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
    if weights is None and not os.environ.get(WEIGHTS_ENV):
        cached = cached_weights_path()
        return cached if cached.is_file() else _download_weights()
    path = Path(os.environ[WEIGHTS_ENV] if weights is None else weights).expanduser()
    if not path.is_file():
        given = f"{WEIGHTS_ENV} names {path}, which" if weights is None else f"the file passed as weights, {path},"
        raise FileNotFoundError(_how_to_provide(f"{given} does not exist"))
    return path


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
    """The trained I3D in evaluation mode, without gradients, from ``weights`` (a .safetensors or tensor-only .pt
    file; None: see ``resolve_weights``). ``"random"``: a random network for tests (meaningless FVDs), the same
    one in every call (a fixed seed)."""
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
