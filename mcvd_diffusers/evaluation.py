"""The evaluation protocol behind eval_mcvd.py: samplers and baselines on the same clips, in one run.

For each sampler, every test clip gets k samples (one seeded generator per video, so the
numbers do not depend on the batch size); each is scored per frame (metrics.py) and
aggregated to mean-of-k and best-of-k. Baselines: copy-last-frame and the ground truth
itself (a sanity row: SSIM 1, LPIPS 0). Each sampler's result is cached in the results
folder, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import html
import json
import os
import subprocess
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.utils import export_to_gif
from tqdm.auto import tqdm

from .data.moving_mnist import clips_to_video, load_mnist_test_seq, load_test_set
from .hub import read_training_info, write_model_card
from .fvd import POOLINGS, fvd_from_features, i3d_features
from .integrity import sha256_file
from .metrics import METRICS, FrameMetrics, aggregate
from .models.i3d import I3D, load_i3d, resolve_weights
from .pipeline_mcvd import MCVDPipeline
from .runtime import autocast, check_precision, device_name, maybe_compile, synchronize, versions
from .schedulers import SAMPLERS, make_sampler, parse_sampler

TEST_SETS = ("generated", "official")
COPY_LAST, GROUND_TRUTH = "copy last frame", "ground truth"
GIF_SAMPLES = 2  # samples per sampler shown in the GIF grid


@dataclass
class EvalConfig:
    model: str
    out: str
    samplers: list[str] = field(default_factory=lambda: ["ddpm:1000", "ddim:50", "dpm++:20"])
    num_clips: int = 256
    samples_per_clip: int = 10
    num_frames: int = 10  # frames predicted after the model's past frames
    test_set: str = "generated"  # the fixed generated test set, or "official" (mnist_test_seq.npy)
    test_file: str | None = None  # path of mnist_test_seq.npy for test_set="official", or "download"
    mnist_root: str | None = None  # MNIST for the generated test set (a folder, "bundled", or None)
    batch_size: int = 64  # videos sampled at once
    seed: int = 0
    device: str | None = None
    gif_clips: int = 4
    timing: bool = True  # also time batch-1 latency
    precision: str = "fp32"  # the UNet's forward under autocast: "fp32", "bf16", "fp16"
    compile: bool = False  # torch.compile the UNet (falls back to eager with a warning)
    update_model_card: bool = False  # write the summary table into the model folder's README.md
    # The reproduction's contrast stretch: each sampler's predictions are also scored after (x - 0.2) / 0.6,
    # clipped to [0, 1], in a row of their own ("NAME:STEPS + stretch"), to show what the stretch is worth.
    stretch: bool = False
    # FVD (mcvd_diffusers/fvd.py): a column per row, from I3D features of every predicted video
    fvd: bool = False
    fvd_weights: str | None = None  # I3D weights file (else $MCVD_I3D_WEIGHTS, else the torch hub cache)
    fvd_include_past: bool = True  # the videos compared are past + predicted frames (MCVD's FVD), else predicted
    fvd_pooling: str = "all"  # "all": the k x N samples as one set; "per_sample": one FVD per sample index, averaged
    fvd_size: int = 224  # the frame size I3D sees; 224 is standard FVD, smaller values are for tests only


def copy_last_frame(past: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The baseline: the last past frame repeated. (B, P, C, H, W) -> (B, num_frames, C, H, W)."""
    return past[:, -1:].expand(-1, num_frames, *past.shape[2:]).clone()


I3D_FEATURES = 400  # the length of an FVD feature vector (I3D's Kinetics-400 logits)
SHIPPED = "shipped"  # in --samplers: the pipeline's own scheduler at its default step count


# What an evaluation writes into its folder; removed when a new evaluation starts, so that the outputs of
# an earlier run never sit beside an interrupted one looking current. metrics.json is written last.
OUTPUT_FILES = ("summary.md", "per_clip.csv", "curves.png", "predictions.gif", "report.html", "metrics.json")


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


def reproduction_stretch(frames: torch.Tensor) -> torch.Tensor:
    """The reproduction's post-processing of predictions before scoring: (x - 0.2) / 0.6 clipped to [0, 1]."""
    return ((frames - 0.2) / 0.6).clamp(0, 1)


def _validate(config: EvalConfig) -> None:
    for spec in config.samplers:
        if spec != SHIPPED:
            parse_sampler(spec)
    if len(set(config.samplers)) != len(config.samplers):
        raise ValueError(f"samplers are listed twice: {config.samplers}")
    for name in ("num_clips", "samples_per_clip", "num_frames", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.seed < 0:
        raise ValueError(f"seed must be >= 0, got {config.seed}")
    if config.gif_clips < 0:
        raise ValueError(f"gif_clips must be >= 0, got {config.gif_clips}")
    if config.test_set not in TEST_SETS:
        raise ValueError(f"test_set must be one of {TEST_SETS}, got {config.test_set!r}")
    if config.test_set == "official" and not config.test_file:
        raise ValueError("test_set='official' needs test_file=<path of mnist_test_seq.npy>")
    if config.fvd and config.fvd_pooling not in POOLINGS:
        raise ValueError(f"fvd_pooling must be one of {POOLINGS}, got {config.fvd_pooling!r}")
    if config.fvd and config.num_clips < 2:
        raise ValueError(f"FVD needs num_clips >= 2 (a covariance of features), got {config.num_clips}")
    if config.fvd and config.fvd_size < 32:
        raise ValueError(f"fvd_size must be >= 32 (224 is the standard), got {config.fvd_size}")
    if config.update_model_card:
        read_training_info(config.model)  # a local folder exported by train_mcvd.py, before any sampling


def load_test_clips(config: EvalConfig) -> tuple[torch.Tensor, dict]:
    """The first ``num_clips`` test clips as uint8 (N, T, H, W) and a description of the test set."""
    if config.test_set == "official":
        download = config.test_file == "download"  # into the package cache, checksum verified
        clips = load_mnist_test_seq(None if download else config.test_file, split="test", download=download)
        info = {"name": "official", "data_source": f"mnist_test_seq.npy ({config.test_file}), last 1000 clips"}
    else:
        dataset, meta = load_test_set(root=config.mnist_root)
        clips, info = dataset.with_format("torch", dtype=torch.uint8)["frames"], {"name": "generated", **meta}
    if config.num_clips > len(clips):
        raise ValueError(f"num_clips={config.num_clips} but the {config.test_set} test set holds {len(clips)} clips")
    return clips[: config.num_clips], info


def _video_generators(device, seed: int, clip_index: torch.Tensor, sample_index: torch.Tensor):
    # One generator per (clip, sample): the same video whatever the batch size or order. Separate bit
    # fields keep the seeds distinct for up to 2**20 clips and 2**20 samples per clip.
    return [torch.Generator(device).manual_seed((seed << 40) + (int(c) << 20) + int(s))
            for c, s in zip(clip_index, sample_index)]


def _time_batch1(pipe, past, steps, num_frames, device, precision) -> float:
    """Seconds for one video at batch 1, after a short warm-up, synchronized."""
    with autocast(precision, device):
        pipe(past[:1], num_frames=num_frames, num_inference_steps=min(steps, 2), generator=torch.Generator(device))
        synchronize(device)
        start = time.perf_counter()
        pipe(past[:1], num_frames=num_frames, num_inference_steps=steps, generator=torch.Generator(device))
        synchronize(device)
    return time.perf_counter() - start


def video_features(i3d: I3D, past: torch.Tensor, frames: torch.Tensor, config: EvalConfig) -> torch.Tensor:
    """I3D features (B, 400) of the videos FVD compares: past + frames, or the frames alone."""
    videos = torch.cat([past.to(frames), frames], dim=1) if config.fvd_include_past else frames
    return i3d_features(videos, i3d, batch_size=config.batch_size, resize_to=config.fvd_size)


def run_sampler(pipe: MCVDPipeline, frame_metrics: FrameMetrics, past: torch.Tensor, future: torch.Tensor,
                steps: int, config: EvalConfig, progress, i3d: I3D | None = None) -> dict:
    """Samples k videos per clip in batches, scores them per frame (also stretched, with ``config.stretch``)
    and, given ``i3d``, takes their FVD features. Returns the per-frame metrics (N, k, F), the features
    (N, k, 400), the predictions of the GIF clips, and timings."""
    device = pipe.device
    n, k = len(past), config.samples_per_clip
    clip_index = torch.arange(n).repeat_interleave(k)
    sample_index = torch.arange(k).repeat(n)
    per_frame = {name: torch.empty(n * k, config.num_frames) for name in frame_metrics.metrics}
    stretched = {name: torch.empty(n * k, config.num_frames) for name in frame_metrics.metrics} if config.stretch else {}
    features = torch.empty(n * k, I3D_FEATURES, dtype=torch.float64) if i3d is not None else None
    shown = min(k, GIF_SAMPLES)
    gif = torch.zeros(min(config.gif_clips, n), shown, *future.shape[1:], dtype=torch.uint8)
    # Warm-up at the batch size, so that the amortized time excludes one-off costs.
    with autocast(config.precision, device):
        pipe(past[:1].expand(min(config.batch_size, n * k), *past.shape[1:]), num_frames=config.num_frames,
             num_inference_steps=min(steps, 2))
    synchronize(device)
    sampling_seconds = 0.0
    for start in range(0, n * k, config.batch_size):
        idx = slice(start, start + config.batch_size)
        clips, samples = clip_index[idx], sample_index[idx]
        generators = _video_generators(device, config.seed, clips, samples)
        begin = time.perf_counter()
        with autocast(config.precision, device):  # the UNet only: metrics below run in fp32
            frames = pipe(past[clips], num_frames=config.num_frames, num_inference_steps=steps,
                          generator=generators).frames
        synchronize(device)
        sampling_seconds += time.perf_counter() - begin
        for name, values in frame_metrics(frames, future[clips]).items():
            per_frame[name][idx] = values
        if stretched:
            for name, values in frame_metrics(reproduction_stretch(frames), future[clips]).items():
                stretched[name][idx] = values
        if features is not None:
            features[idx] = video_features(i3d, past[clips], frames, config)
        for j, (c, s) in enumerate(zip(clips.tolist(), samples.tolist())):
            if c < len(gif) and s < shown:
                gif[c, s] = (frames[j].cpu() * 255).round().byte()
        progress.update(len(clips))
    timing = {"seconds_per_video_amortized": sampling_seconds / (n * k), "batch_size": config.batch_size}
    if config.timing:
        timing["seconds_per_video_batch1"] = _time_batch1(pipe, past, steps, config.num_frames, device,
                                                          config.precision)
    return {"per_frame": {name: v.view(n, k, -1) for name, v in per_frame.items()}, "gif": gif, "timing": timing,
            "stretched": {name: v.view(n, k, -1) for name, v in stretched.items()},
            "fvd_features": None if features is None else features.view(n, k, -1)}


def _cache_key(config: EvalConfig, pipe: MCVDPipeline, test_info: dict, sampler_config: dict, steps: int,
               fvd_weights: str | None = None) -> str:
    weights = hashlib.sha256()
    for tensor in pipe.unet.state_dict().values():
        weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    # Everything that changes the numbers or the timings reused from the cache: the device and the
    # timing settings (batch size, compile, precision) too, so that no reused timing is another machine's.
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("samplers", "out", "device",
                                                                                "update_model_card")}
    key = {"weights": weights.hexdigest(), "config": fields, "device": device_name(pipe.device),
           "test_set": {k: v for k, v in test_info.items() if k != "path"},
           # diffusers' private config entries ("_use_default_values": a list in set order, which Python's
           # hash randomization reshuffles in every process) say nothing about what the sampler does
           "sampler": {k: v for k, v in sampler_config.items() if not k.startswith("_")}, "steps": steps,
           "metrics": list(METRICS), "fvd_weights": fvd_weights}
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


def _load_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            per_frame = {k[len("metric_"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("metric_")}
            stretched = {k[len("stretched_"):]: torch.from_numpy(data[k]) for k in data.files
                         if k.startswith("stretched_")}
            features = torch.from_numpy(data["fvd_features"]) if "fvd_features" in data.files else None
            return {"per_frame": per_frame, "gif": torch.from_numpy(data["gif"]), "stretched": stretched,
                    "fvd_features": features, "timing": json.loads(str(data["timing"]))}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:  # truncated, zeroed, edited
        warnings.warn(f"{path} is unreadable ({type(e).__name__}: {e}); recomputing it", stacklevel=2)
        return None


def _home_relative(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate(config: EvalConfig) -> dict:
    """Runs the protocol and writes every output into ``config.out``; returns what metrics.json holds."""
    _validate(config)  # names and numbers first, then files: all before any sampling
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    pipe = MCVDPipeline.from_pretrained(config.model)
    shipped = shipped_sampler(pipe)
    if SHIPPED in config.samplers and shipped is None:
        raise ValueError(f"--samplers {SHIPPED}: {config.model} ships with {type(pipe.scheduler).__name__}, which is "
                         f"none of the named samplers {sorted(SAMPLERS)}; name the sampler instead")
    specs = list(dict.fromkeys(shipped if spec == SHIPPED else spec for spec in config.samplers))
    samplers = [parse_sampler(spec) for spec in specs]
    clips, test_info = load_test_clips(config)
    unet_cfg = pipe.unet.config
    num_past = unet_cfg.num_past_frames
    if num_past + config.num_frames > clips.shape[1]:
        raise ValueError(f"the test clips hold {clips.shape[1]} frames: {num_past} past + num_frames="
                         f"{config.num_frames} do not fit")
    if tuple(clips.shape[2:]) != pipe.unet.frame_shape[1:] or pipe.unet.frame_shape[0] != 1:
        raise ValueError(f"the test frames are 1x{clips.shape[2]}x{clips.shape[3]}, the model expects "
                         f"{'x'.join(map(str, pipe.unet.frame_shape))}")
    i3d, fvd_weights = None, None
    if config.fvd:  # before any sampling: weights that cannot be found or loaded fail here
        i3d = load_i3d(config.fvd_weights, device)
        fvd_weights = ("random (tests only)" if config.fvd_weights == "random"
                       else f"sha256:{sha256_file(resolve_weights(config.fvd_weights))}")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    frame_metrics = FrameMetrics(device)
    video = clips_to_video(clips)
    past, future = video[:, :num_past], video[:, num_past : num_past + config.num_frames]
    real_features = video_features(i3d, past, future, config) if i3d is not None else None
    if config.compile:
        with autocast(config.precision, device):
            maybe_compile(pipe.unet, lambda: pipe(past[:1], num_frames=config.num_frames, num_inference_steps=1))
    out = Path(config.out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # an earlier run's results must not look like this run's if it is interrupted
        (out / name).unlink(missing_ok=True)

    rows: dict[str, dict] = {}
    for label, prediction in ((GROUND_TRUTH, future), (COPY_LAST, copy_last_frame(past, config.num_frames))):
        # in batches, like the samplers: LPIPS-VGG on every frame of 256 clips at once needs over 20 GiB
        parts = [frame_metrics(prediction[i : i + config.batch_size], future[i : i + config.batch_size])
                 for i in range(0, len(future), config.batch_size)]
        per_frame = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        rows[label] = {"kind": "baseline", "samples_per_clip": 1,
                       "per_frame": {k: v[:, None] for k, v in per_frame.items()}, "timing": {}}
        if i3d is not None:
            rows[label]["fvd"] = fvd_from_features(video_features(i3d, past, prediction, config)[:, None],
                                                   real_features, config.fvd_pooling)
    gifs = {}
    total = len(samplers) * len(past) * config.samples_per_clip
    trained_config = pipe.scheduler.config  # every sampler is built from the pipeline's own scheduler config
    with tqdm(total=total, desc="evaluate", unit="video") as progress:
        for (name, steps), spec in zip(samplers, specs):
            progress.set_postfix(sampler=spec)
            pipe.scheduler = make_sampler(name, trained_config)
            cache = out / "cache" / f"{name.replace('+', 'p')}-{steps}.npz"
            key = _cache_key(config, pipe, test_info, dict(pipe.scheduler.config), steps, fvd_weights)
            result = _load_cache(cache, key)
            if result is None:
                result = run_sampler(pipe, frame_metrics, past, future, steps, config, progress, i3d)
                _save_cache(cache, key, result)
            else:
                progress.update(len(past) * config.samples_per_clip)
                tqdm.write(f"{spec}: reused {cache}")
            rows[spec] = {"kind": "sampler", "scheduler": type(pipe.scheduler).__name__, "steps": steps,
                          "scheduler_config": dict(pipe.scheduler.config), "samples_per_clip": config.samples_per_clip,
                          "per_frame": result["per_frame"], "timing": result["timing"]}
            if i3d is not None:
                rows[spec]["fvd"] = fvd_from_features(result["fvd_features"], real_features, config.fvd_pooling)
            if config.stretch:
                rows[f"{spec} + stretch"] = {**rows[spec], "kind": "sampler, stretched", "fvd": None,
                                             "per_frame": result["stretched"]}
            gifs[spec] = result["gif"]

    for row in rows.values():
        row["metrics"] = aggregate(row.pop("per_frame"))
    record = {
        "model": str(config.model),
        "model_config": dict(unet_cfg),
        "eval_config": dataclasses.asdict(config),
        # the cache folder of the test set, written relative to the home folder: results are shared
        "test_set": {k: _home_relative(v) if k == "path" else v for k, v in test_info.items()},
        "data_source": test_info["data_source"],
        "device": device_name(device),
        "versions": versions(),
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "shipped_sampler": shipped,
        "fvd": None if i3d is None else {"weights": fvd_weights, "include_past": config.fvd_include_past,
                                         "pooling": config.fvd_pooling, "frame_size": config.fvd_size},
        "rows": rows,
    }
    write_outputs(out, record, past[: config.gif_clips], future[: config.gif_clips], gifs)
    if config.update_model_card:
        update_model_card(Path(config.model), record)
    return record


def shipped_sampler(pipe: MCVDPipeline) -> str | None:
    """The pipeline's own sampler as NAME:STEPS (its scheduler is a named sampler of SAMPLERS, STEPS its
    default step count), or None when it ships with a scheduler of its own."""
    own = dict(pipe.scheduler.config)
    for name, (cls, _) in SAMPLERS.items():
        if type(pipe.scheduler) is cls and dict(make_sampler(name, own).config) == own:
            return f"{name}:{pipe.config.default_num_inference_steps}"
    return None


def update_model_card(folder: Path, record: dict) -> Path:
    """Adds this evaluation's table to the model card of a pipeline exported by our training."""
    info = read_training_info(folder)
    info["evaluation"] = {"command": record["command"], "num_clips": record["eval_config"]["num_clips"],
                          "samples_per_clip": record["eval_config"]["samples_per_clip"],
                          "data_source": record["data_source"], "device": record["device"],
                          "table": summary_table(record)}
    return write_model_card(folder, info)


# ---------------------------------------------------------------------------------- outputs
SUMMARY_COLUMNS = [("mse", "MSE", 4), ("psnr", "PSNR", 2), ("ssim", "SSIM", 3), ("ssim_binarized", "SSIM bin", 3),
                   ("lpips_alex", "LPIPS-alex", 3), ("lpips_vgg", "LPIPS-vgg", 3)]


def _fmt_seconds(value) -> str:
    return "" if value is None else f"{value:.4g}"


def protocol_notes(record: dict) -> list[str]:
    """Sentences that say what the stretched rows and the FVD column are, when a record has them."""
    notes = []
    if record["eval_config"].get("stretch"):
        notes.append("Rows marked '+ stretch' score the same predictions after the reproduction's contrast stretch, "
                     "(x - 0.2) / 0.6 clipped to [0, 1], which turns grey pixels black or white and so raises SSIM "
                     "without predicting anything better; the rows without it are the honest numbers.")
    fvd = record.get("fvd")
    if fvd:
        notes.append(f"FVD (lower is better): I3D Kinetics-400 logits of {'past + predicted' if fvd['include_past'] else 'predicted'} "
                     f"frames at {fvd['frame_size']} px, "
                     + ("all k x N samples as one set" if fvd["pooling"] == "all" else "one FVD per sample index, averaged")
                     + f", against the N real videos; I3D weights {fvd['weights']}.")
    return notes


def summary_table(record: dict) -> str:
    """The markdown table: one line per row and aggregation (mean-of-k, best-of-k), mean ± 95% interval."""
    with_fvd = record.get("fvd") is not None
    header = ["row", "steps", "s/video (batch 1)", "s/video (amortized)", "k", "aggregate",
              *[title for _, title, _ in SUMMARY_COLUMNS], *(["FVD"] if with_fvd else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in record["rows"].items():
        for aggregate_name in ("mean_of_k", "best_of_k"):
            if aggregate_name == "best_of_k" and row["samples_per_clip"] == 1:
                continue
            shown = f"{label} (shipped)" if label == record.get("shipped_sampler") else label
            cells = [shown, str(row.get("steps", "")), _fmt_seconds(row["timing"].get("seconds_per_video_batch1")),
                     _fmt_seconds(row["timing"].get("seconds_per_video_amortized")), str(row["samples_per_clip"]),
                     aggregate_name.replace("_", "-")]
            for metric, _, digits in SUMMARY_COLUMNS:
                stats = row["metrics"][metric][aggregate_name]
                cells.append(f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f}")
            if with_fvd:  # a set-level number: one per row, on the mean-of-k line
                fvd_value = row.get("fvd") if aggregate_name == "mean_of_k" else None
                cells.append("" if fvd_value is None else f"{fvd_value:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, record: dict, past: torch.Tensor, future: torch.Tensor, gifs: dict) -> None:
    json_record = json.loads(json.dumps(record, default=str))
    for row in json_record["rows"].values():  # per-clip values live in per_clip.csv
        for stats in row["metrics"].values():
            stats.pop("per_clip_mean_of_k"), stats.pop("per_clip_best_of_k")
    _write_per_clip_csv(out / "per_clip.csv", record)
    table = summary_table(record)
    (out / "summary.md").write_text(
        f"# Evaluation of {record['model']}\n\n"
        f"{record['eval_config']['num_clips']} clips of the {record['test_set']['name']} test set "
        f"({record['data_source']}), {record['eval_config']['samples_per_clip']} samples per clip, device "
        f"{record['device']}. Values: mean over clips ± 95% interval; per frame, then mean-of-k or best-of-k "
        f"per clip. PSNR capped at 100 dB.\n\n{table}\n" + "".join(f"\n{note}\n" for note in protocol_notes(record)))
    plot_curves(out / "curves.png", record)
    if len(past) and gifs:
        predictions = {f"{spec} #{s + 1}": gif[:, s].float() / 255 for spec, gif in gifs.items()
                       for s in range(gif.shape[1])}
        comparison_gif(out / "predictions.gif", past, future, predictions)
    write_report(out / "report.html", record, table, out / "curves.png",
                 out / "predictions.gif" if (out / "predictions.gif").exists() else None)
    tmp = out / ".metrics.json.partial"
    tmp.write_text(json.dumps(json_record, indent=2))
    os.replace(tmp, out / "metrics.json")  # last: its presence says the evaluation finished


def _write_per_clip_csv(path: Path, record: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "clip", *[f"{m}_{a}" for m in METRICS for a in ("mean_of_k", "best_of_k")]])
        for label, row in record["rows"].items():
            metrics = row["metrics"]
            for clip in range(len(metrics["mse"]["per_clip_mean_of_k"])):
                writer.writerow([label, clip, *[f"{metrics[m][f'per_clip_{a}'][clip]:.6g}" for m in METRICS
                                                for a in ("mean_of_k", "best_of_k")]])


def plot_curves(path: Path, record: dict) -> None:
    """SSIM, PSNR and LPIPS against the predicted frame's index, one line per sampler and baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ssim", "SSIM"), ("psnr", "PSNR (dB)"), ("lpips_alex", "LPIPS (AlexNet)"), ("lpips_vgg", "LPIPS (VGG)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (metric, title) in zip(axes, panels):
        for label, row in record["rows"].items():
            if label == GROUND_TRUTH:
                continue  # a flat line at the perfect score
            curve = row["metrics"][metric]["per_frame"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                    linestyle="--" if row["kind"] == "baseline" else "-", label=label)
        ax.set_xlabel("predicted frame")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("per-frame metrics (mean over clips and samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tile(frame: torch.Tensor, scale: int, border: tuple[int, int, int]) -> np.ndarray:
    """A (1, H, W) frame in [0, 1] -> an RGB tile with a 2-pixel colored border."""
    grey = (frame[0].clamp(0, 1) * 255).round().byte().numpy()
    grey = grey.repeat(scale, 0).repeat(scale, 1)
    tile = np.empty((grey.shape[0] + 4, grey.shape[1] + 4, 3), dtype=np.uint8)
    tile[:] = border
    tile[2:-2, 2:-2] = grey[..., None]
    return tile


def comparison_gif(path: str | os.PathLike, past: torch.Tensor, target: torch.Tensor,
                   predictions: dict[str, torch.Tensor], scale: int = 2, fps: int = 4) -> Path:
    """A GIF grid: one row per clip, columns ground truth then each prediction.

    The past frames play first in every column (green border), then the future
    (white border for ground truth, red for predictions)."""
    GREEN, WHITE, RED = (40, 200, 70), (255, 255, 255), (220, 50, 50)
    columns = {GROUND_TRUTH: target, **predictions}
    tile_width = past.shape[-1] * scale + 4
    frames = []
    for t in range(past.shape[1] + target.shape[1]):
        rows = []
        for b in range(past.shape[0]):
            tiles = []
            for label, video in columns.items():
                if t < past.shape[1]:
                    tiles.append(_tile(past[b, t], scale, GREEN))
                else:
                    tiles.append(_tile(video[b, t - past.shape[1]], scale, WHITE if label == GROUND_TRUTH else RED))
            rows.append(np.concatenate(tiles, axis=1))
        grid = np.concatenate(rows, axis=0)
        image = PIL.Image.new("RGB", (grid.shape[1], grid.shape[0] + 28))
        draw = PIL.ImageDraw.Draw(image)
        for i, label in enumerate(columns):
            name, _, sample = label.partition(" #")
            draw.text((i * tile_width + 3, 1), name, fill=(255, 255, 255))
            draw.text((i * tile_width + 3, 13), f"sample {sample}" if sample else "", fill=(200, 200, 200))
        phase = "past" if t < past.shape[1] else "future"
        draw.text((grid.shape[1] - 70, 13), f"t={t} {phase}", fill=(160, 160, 160))
        image.paste(PIL.Image.fromarray(grid), (0, 28))
        frames.append(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_gif(frames, str(path), fps=fps)
    return path


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _markdown_table_to_html(table: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in table.splitlines()]
    head, body = lines[0], lines[2:]
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731
    return ("<table><thead><tr>" + cells(head, "th") + "</tr></thead><tbody>"
            + "".join("<tr>" + cells(row, "td") + "</tr>" for row in body) + "</tbody></table>")


def write_report(path: Path, record: dict, table: str, curves: Path, gif: Path | None) -> None:
    """One self-contained HTML page: the table, the curves and the GIF, images inlined."""
    cfg = record["eval_config"]
    details = {
        "model": record["model"], "test set": f"{record['test_set']['name']}: {record['data_source']}",
        "clips": cfg["num_clips"], "samples per clip": cfg["samples_per_clip"],
        "frames predicted": cfg["num_frames"], "device": record["device"],
        "versions": ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v),
        "git commit": record["git_commit"] or "unknown",
    }
    gif_html = (f'<h2>Predictions</h2><p>Rows: clips. Columns: ground truth, then samples of each sampler. '
                f'Green border: past frames; red: predicted.</p><img alt="predictions" src="{_data_uri(gif, "image/gif")}">'
                if gif else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MCVD evaluation: {html.escape(record['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
</style></head><body>
<h1>MCVD evaluation</h1>
<ul>{"".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in details.items())}</ul>
<h2>Results</h2>
<p>Mean over clips ± 95% interval. Per clip: metrics averaged over the predicted frames, then over the
k samples (mean-of-k) or the best sample (best-of-k). No post-processing of predictions (except in rows
marked '+ stretch').</p>
{_markdown_table_to_html(table)}
{"".join(f"<p>{html.escape(note)}</p>" for note in protocol_notes(record))}
<h2>Per-frame metrics</h2>
<img alt="per-frame metric curves" src="{_data_uri(curves, 'image/png')}">
{gif_html}
</body></html>
"""
    path.write_text(page)
