"""Device facts and the opt-in fast paths (precision, channels_last, torch.compile), in one place.

Each fast path is a switch with a safe default; none changes results beyond numerical
tolerance. A request the device cannot honour raises, rather than running something else
that the results would then misname (e.g. fp32 reported as bf16).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import warnings

import torch

# One vocabulary for precision: "no" is Accelerate's name for fp32 (TrainConfig.mixed_precision uses Accelerate's
# names, which it passes on as they are), "fp32" the evaluation's and the benchmarks'.
PRECISIONS = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def resolve_device(name: str | None) -> torch.device:
    """--device: cpu, cuda, cuda:N (default: cuda when available, else cpu); a clear error otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but no CUDA GPU is available here (torch "
                             f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise ValueError(f"device {name!r} is not available here; use cpu")
    return device


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "accelerate", "torchmetrics", "datasets", "mcvd-diffusers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def synchronize(device: torch.device | str) -> None:
    """Waits for queued GPU work, so wall-clock timings measure the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of a precision name, or a ValueError when the device cannot run it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 was requested, but {device_name(device)} does not support it: use fp16 or fp32")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 mixed precision (with loss scaling) needs a CUDA device; on CPU use bf16 or fp32")
    return PRECISIONS[precision]


def autocast(precision: str, device: torch.device | str):
    """Autocast for the network's forward pass (a no-op for fp32); parameters stay fp32."""
    dtype = check_precision(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """NHWC weights: convolutions then run in the layout tensor cores prefer; inputs follow."""
    return module.to(memory_format=torch.channels_last)


def maybe_compile(module: torch.nn.Module, example_call=None) -> bool:
    """Compiles ``module`` in place with torch.compile; runs ``example_call()`` to trigger the compilation
    now. Where compilation is unsupported or fails, warns and leaves the module eager. Returns True if
    compiled."""
    try:
        module.compile()
        if example_call is not None:
            example_call()
        return True
    except Exception as e:  # backend missing (no compiler), unsupported platform or op
        module._compiled_call_impl = None  # back to eager
        warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}: {e}); running eager", stacklevel=2)
        return False
