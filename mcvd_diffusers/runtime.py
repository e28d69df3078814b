"""Device facts and the opt-in fast paths (precision, channels_last, torch.compile): none changes results beyond
numerical tolerance, and a request the device cannot honour raises rather than running something the results would
misname (fp32 reported as bf16). Precision ``auto`` runs bf16 only where the hardware runs it natively (a CUDA GPU
that supports it, a CPU with AVX512-BF16 or AMX): elsewhere torch emulates it, far slower."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import warnings
from pathlib import Path

import torch

# "no" is Accelerate's name for fp32 (TrainConfig.mixed_precision's), "fp32" the evaluation's and the benchmarks'.
PRECISIONS = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", "no", "fp32", "bf16", "fp16")  # what a user may ask for
CHOICES_TEXT = "auto, no (or fp32), bf16, fp16"
_warned_emulated_bf16 = False  # explicit bf16 on a CPU that emulates it warns once per process


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model_name()}, {platform.machine()}, {torch.get_num_threads()} threads)"


def machine_state() -> dict:
    """What a timing depends on beyond the code: the CPU, native bf16, torch's threads, the cores, and the
    load average (1, 5, 15 minutes) when it is called: a load above the cores means other work shared them."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu_model_name(), "cpu_native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "load_average": [round(x, 2) for x in load]}


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX tiles, as torch reports)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # torch's private probes fail (or are missing) on this platform: not native
        return False


@functools.lru_cache(maxsize=None)
def cpu_model_name() -> str:
    """/proc/cpuinfo's 'model name', else platform.processor() (else the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cuda_has_native_bf16(device: torch.device | str) -> bool:
    """Whether a CUDA GPU runs bf16 natively (Ampere and later), not as an emulation."""
    with torch.cuda.device(torch.device(device)):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch, which counts only native support
            return torch.cuda.is_bf16_supported()


def bf16_is_native(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(requested: str, device: torch.device | str, fp32: str = "no") -> str:
    """The precision to run ``requested`` as on ``device``: "bf16", "fp16", or ``fp32`` (the caller's name for fp32:
    "no" for training, "fp32" for the evaluation and the benchmarks). An explicit precision the device cannot run
    raises (check_precision); explicit bf16 on a CPU that emulates it warns, once per process."""
    global _warned_emulated_bf16
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {requested!r}; choose one of {CHOICES_TEXT}")
    device = torch.device(device)
    if requested == "auto":
        return "bf16" if bf16_is_native(device) else fp32
    check_precision(requested, device)
    if requested == "bf16" and device.type == "cpu" and not _warned_emulated_bf16 and not cpu_has_native_bf16():
        _warned_emulated_bf16 = True
        warnings.warn(f"bf16 was asked for, but this CPU ({cpu_model_name()}) has no native bf16 (AVX512-BF16 or "
                      "AMX): torch emulates it, about 20x slower than fp32 (one training step of configs/cpu.yaml at "
                      "batch 64: about 23 s in bf16 vs 1.2 s in fp32, measured on an AMD EPYC Zen 3 with AVX2 only, "
                      "torch 2.14.1). Precision auto runs fp32 here.", UserWarning, stacklevel=2)
    return fp32 if PRECISIONS[requested] == torch.float32 else requested


def precision_info(requested: str, device: torch.device | str, fp32: str = "no") -> dict:
    """resolve_precision, and what a run records of it: what was asked for, what runs, why, and the CPU's facts."""
    resolved = resolve_precision(requested, device, fp32)
    device = torch.device(device)
    native_cpu, cpu = cpu_has_native_bf16(), cpu_model_name()
    if device.type == "cuda":
        hardware = f"{device_name(device)} {'supports bf16' if cuda_has_native_bf16(device) else 'has no native bf16'}"
    elif device.type == "cpu":
        hardware = f"this CPU has {'native bf16' if native_cpu else 'no native bf16 (AVX512-BF16 or AMX)'}: {cpu}"
    else:
        hardware = f"{device.type} device"
    reason = f"auto: {hardware}" if requested == "auto" else f"as configured; {hardware}"
    return {"requested": requested, "resolved": resolved, "reason": reason, "device": device_name(device),
            "cpu_model": cpu, "cpu_native_bf16": native_cpu}


def describe_precision(info: dict) -> str:
    """The line a run prints at its start, e.g. "precision: bf16 (auto: this CPU has native bf16: <model>)"."""
    name = "fp32" if PRECISIONS.get(info["resolved"]) == torch.float32 else info["resolved"]
    return f"precision: {name} ({info['reason']})"


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
    """torch.compile ``module`` in place and run ``example_call()`` to compile now; True if compiled. Where
    compilation is unsupported or fails, warns and leaves the module eager."""
    try:
        module.compile()
        if example_call is not None:
            example_call()
        return True
    except Exception as e:  # backend missing (no compiler), unsupported platform or op
        module._compiled_call_impl = None  # back to eager
        warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}: {e}); running eager", stacklevel=2)
        return False
