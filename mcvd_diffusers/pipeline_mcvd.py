"""MCVDPipeline: video prediction, unconditional generation and interpolation with any diffusers scheduler."""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from .integrity import check_finite, check_tensor_names, verify_checksums
from .models.unet_mcvd import MCVDUNet2DModel

OUTPUT_TYPES = ("pt", "np", "pil")
# The diffusers schedulers this pipeline's loop drives exactly: given a UNet that predicts a known video
# perfectly, each returns that video (tests/test_pipeline.py, for every prediction type). The loop passes
# discrete timesteps t and scales inputs with scale_model_input; schedulers that hand the UNet sigma-space
# noise levels (the EDM family, consistency models) would run on wrong timesteps, and DEIS, PNDM, SA-Solver
# and TCD stop one step short of a clean sample (the last step's noise stays), so they are refused.
SUPPORTED_SCHEDULERS = (
    "DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "LCMScheduler",
)


@dataclass
class MCVDPipelineOutput(BaseOutput):
    """``frames``: "pt" (B, F, C, H, W) in [0, 1]; "np" (B, F, H, W, C) in [0, 1]; "pil" B lists of F images."""

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Raises a clear error when a saved pipeline folder lacks a file or holds a corrupt one."""
    folder = str(folder)
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{folder} is not a saved MCVDPipeline: model_index.json is missing")
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder}: {name} is missing") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is corrupt (not valid JSON: {e})") from e
    unet_dir = os.path.join(folder, "unet")
    weights = sorted(f for f in os.listdir(unet_dir) if f.endswith(".safetensors"))
    if not weights:
        raise FileNotFoundError(f"{unet_dir} holds no .safetensors weight file (diffusion_pytorch_model.safetensors)")
    verify_checksums(folder)  # exports record them; a folder without checksums.json skips this
    found = {}
    for name in weights:
        try:
            with safe_open(os.path.join(unet_dir, name), framework="pt") as f:
                found.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{os.path.join(unet_dir, name)} is corrupt or truncated ({e})") from e
    with open(os.path.join(unet_dir, "config.json")) as f:
        unet_config = json.load(f)
    try:
        with torch.device("meta"):  # names and shapes only: no memory, no initialization
            expected = {k: tuple(v.shape) for k, v in MCVDUNet2DModel.from_config(unet_config).state_dict().items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{unet_dir}/config.json does not describe an MCVDUNet2DModel ({e})") from e
    check_tensor_names(f"{unet_dir} (its weight files)", found, expected)


def _is_count(value) -> bool:
    """An integer >= 1: Python or numpy integers, not bools or floats."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


class MCVDPipeline(DiffusionPipeline):
    r"""Masked Conditional Video Diffusion on top of an ``MCVDUNet2DModel``.

    Given ``num_past_frames`` frames it generates the next ``num_frames``, one block of
    ``num_current_frames`` at a time: after each block the conditioning window slides onto
    the frames just generated, with fresh noise for the next block (MCVD's autoregressive
    rollout). The scheduler can be any diffusers scheduler, e.g.
    ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.

    ``default_num_inference_steps`` (saved in ``model_index.json``) is the step count a call uses
    when it names none: a trained pipeline ships the count its scheduler was chosen with.
    ``default_num_frames`` (also saved) is how many frames a call generates when it names none:
    None is one block (``num_current_frames``); trained pipelines ship the task's 10, so that a model
    that generates 2 frames per pass still answers ``pipe(past)`` with the next 10.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: MCVDUNet2DModel, scheduler: SchedulerMixin, default_num_inference_steps: int = 50,
                 default_num_frames: int | None = None):
        super().__init__()
        if not _is_count(default_num_inference_steps):
            raise ValueError(f"default_num_inference_steps must be an integer >= 1, got {default_num_inference_steps!r}")
        if default_num_frames is not None and not _is_count(default_num_frames):
            raise ValueError(f"default_num_frames must be an integer >= 1 or None, got {default_num_frames!r}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(default_num_inference_steps=int(default_num_inference_steps),
                                default_num_frames=None if default_num_frames is None else int(default_num_frames))
        self.video_processor = VideoProcessor(do_resize=False, do_normalize=True)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Reads model_index.json. An export's remote code (remote_code.py) names its own copies of the classes
        there, for plain diffusers; this class loads with the classes it is defined with, running no folder code."""
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
        for name, annotation in inspect.get_annotations(cls.__init__, eval_str=True).items():
            entry = config.get(name)
            if isinstance(entry, list) and len(entry) == 2 and entry[1] == getattr(annotation, "__name__", None):
                config[name] = [annotation.__module__, entry[1]]
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Loads a local folder, or a Hub repo id: its snapshot is downloaded first, then loaded
        from disk, since diffusers cannot resolve this package's UNet class from the Hub itself."""
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
                raise FileNotFoundError(f"{path} is not a folder holding a saved MCVDPipeline")
            try:
                path = snapshot_download(
                    repo_id=path,
                    revision=kwargs.pop("revision", None),
                    token=kwargs.pop("token", None),
                    cache_dir=kwargs.get("cache_dir"),
                    local_files_only=kwargs.pop("local_files_only", False),
                )
            except Exception as e:  # offline, unknown repo, bad id: huggingface_hub raises several kinds
                raise FileNotFoundError(
                    f"{path} is neither a local folder nor a Hub repo that could be downloaded "
                    f"({type(e).__name__}: {e})"
                ) from e
        check_pipeline_folder(path)
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(path, **kwargs)
        check_finite(f"{path}/unet", pipe.unet.state_dict())
        return pipe

    # ------------------------------------------------------------------ inputs
    def _to_model_frames(self, frames, name: str, count: int) -> torch.Tensor:
        """Validates user frames and returns them as (B, count, C, H, W) in [-1, 1] on the UNet's device."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(frames).__name__}")
        channels, height, width = self.unet.frame_shape
        if frames.ndim == 4 and channels == 1:
            frames = frames[:, :, None]
        if frames.ndim != 5:
            raise ValueError(
                f"{name} must have shape (B, {count}, H, W) or (B, {count}, C, H, W), got {tuple(frames.shape)}"
            )
        if frames.shape[0] == 0:
            raise ValueError(f"{name} holds no videos (a batch of 0, shape {tuple(frames.shape)}); pass at least one")
        if frames.shape[1] != count:
            raise ValueError(f"{name} must hold {count} frames per video (this model's layout), got {frames.shape[1]}")
        if tuple(frames.shape[2:]) != (channels, height, width):
            raise ValueError(
                f"{name} frames must be {channels}x{height}x{width} (C x H x W), got "
                f"{'x'.join(map(str, frames.shape[2:]))}; resize them yourself, the pipeline does not"
            )
        if frames.dtype == torch.uint8:
            frames = frames.float() / 255
        elif frames.is_floating_point():
            frames = frames.float()
            if not torch.isfinite(frames).all():
                raise ValueError(f"{name} contains NaN or infinite values")
            low, high = frames.min().item(), frames.max().item()
            if low < 0 or high > 1:
                raise ValueError(
                    f"float {name} must lie in [0, 1], got values in [{low:.3g}, {high:.3g}] (pass uint8 for 0..255)"
                )
        else:
            raise ValueError(f"{name} must be uint8 (0..255) or float (0..1), got {frames.dtype}")
        return self.video_processor.normalize(frames).to(device=self._execution_device, dtype=self.unet.dtype)

    def check_inputs(self, past_frames, future_frames, num_frames, num_inference_steps, batch_size, output_type):
        cfg = self.unet.config
        if type(self.scheduler).__name__ not in SUPPORTED_SCHEDULERS:
            raise ValueError(f"{type(self.scheduler).__name__} is not supported by MCVDPipeline: it does not sample "
                             f"this model's discrete-timestep diffusion exactly. Use one of {list(SUPPORTED_SCHEDULERS)}"
                             ", e.g. DDIMScheduler.from_config(pipe.scheduler.config)")
        if getattr(cfg, "residual_to_last_past", False) and self.scheduler.config.prediction_type != "sample":
            raise ValueError("this UNet predicts x0 relative to the last past frame (residual_to_last_past), so its "
                             "scheduler needs prediction_type='sample', got "
                             f"{self.scheduler.config.prediction_type!r}")
        if not _is_count(num_inference_steps):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not _is_count(num_frames):
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if past_frames is None and not self.unet.can_generate_without_past:
            raise ValueError(
                "past_frames=None asks for unconditional generation, but this model was trained without past "
                "masking (prob_mask_past=0): pass past_frames"
            )
        if past_frames is None and num_frames > cfg.num_current_frames and cfg.num_current_frames < cfg.num_past_frames:
            raise ValueError(
                f"an unconditional rollout beyond one block needs num_current_frames ({cfg.num_current_frames}) >= "
                f"num_past_frames ({cfg.num_past_frames}); ask for at most {cfg.num_current_frames} frames"
            )
        if future_frames is not None:
            if cfg.num_future_frames == 0:
                raise ValueError("future_frames given, but this model was not trained for interpolation "
                                 "(num_future_frames=0)")
            if num_frames != cfg.num_current_frames:
                raise ValueError(f"interpolation fills exactly num_current_frames={cfg.num_current_frames} frames; "
                                 f"got num_frames={num_frames}")
        elif not self.unet.can_generate_without_future:
            raise ValueError(
                f"this model always saw {cfg.num_future_frames} future frames in training (prob_mask_future=0): "
                "pass future_frames"
            )
        if batch_size is not None and not _is_count(batch_size):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")

    def prepare_extra_step_kwargs(self, generator, eta):
        # Schedulers differ in what step() takes: pass eta (DDIM) and generator only where accepted.
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        past_frames: torch.Tensor | np.ndarray | None = None,
        future_frames: torch.Tensor | np.ndarray | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int | None = None,
        eta: float = 0.0,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> MCVDPipelineOutput | tuple:
        r"""Generates video frames.

        Args:
            past_frames: (B, P, H, W) or (B, P, C, H, W), float in [0, 1] or uint8, torch or numpy,
                with P = ``unet.config.num_past_frames``. None: unconditional generation (models
                trained with past masking).
            future_frames: (B, F, ...) like ``past_frames``, F = ``num_future_frames``: interpolation.
            num_frames: frames to generate; default ``config.default_num_frames`` (trained pipelines: 10),
                else one block (``num_current_frames``). More than one block rolls out autoregressively;
                the last block is cut to the requested count.
            num_inference_steps: denoising steps per block; default ``config.default_num_inference_steps``.
            generator: one ``torch.Generator``, or one per video, for reproducible results.
            batch_size: videos to generate when ``past_frames`` is None (default 1).
            eta: DDIM's eta (0 = deterministic DDIM); ignored by schedulers without it.
            output_type: "pt", "np" or "pil".
        """
        cfg = self.unet.config
        if num_frames is None:
            num_frames = getattr(self.config, "default_num_frames", None) or cfg.num_current_frames
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        self.check_inputs(past_frames, future_frames, num_frames, num_inference_steps, batch_size, output_type)
        num_frames, num_inference_steps = int(num_frames), int(num_inference_steps)  # numpy integers too
        batch_size = None if batch_size is None else int(batch_size)
        past = None if past_frames is None else self._to_model_frames(past_frames, "past_frames", cfg.num_past_frames)
        future = (None if future_frames is None
                  else self._to_model_frames(future_frames, "future_frames", cfg.num_future_frames))
        batch = past.shape[0] if past is not None else (batch_size or 1)
        if past is not None and batch_size not in (None, batch):
            raise ValueError(f"batch_size={batch_size} but past_frames holds {batch} videos")
        if future is not None and len(future) != batch:
            raise ValueError(f"future_frames holds {len(future)} videos, expected {batch}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {batch} videos; "
                             "pass one generator, or one per video")

        device, dtype = self._execution_device, self.unet.dtype
        block_shape = (batch, cfg.num_current_frames, *self.unet.frame_shape)
        num_blocks = math.ceil(num_frames / cfg.num_current_frames)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        blocks = []
        was_training = self.unet.training
        self.unet.eval()  # no dropout while sampling, also for a model handed over mid-training
        with self.progress_bar(total=num_blocks * len(self.scheduler.timesteps)) as progress_bar:
            for _ in range(num_blocks):
                self.scheduler.set_timesteps(num_inference_steps, device=device)  # resets multistep state
                latents = randn_tensor(block_shape, generator=generator, device=device, dtype=dtype)
                latents = latents * self.scheduler.init_noise_sigma
                for t in self.scheduler.timesteps:
                    model_input = self.scheduler.scale_model_input(latents, t)
                    model_output = self.unet(model_input, t, past_frames=past, future_frames=future).sample
                    latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
                    progress_bar.update()
                blocks.append(latents)
                if cfg.num_past_frames > 0:  # slide the conditioning window onto the generated frames
                    window = latents if past is None else torch.cat([past, latents], dim=1)
                    past = window[:, -cfg.num_past_frames:]

        self.unet.train(was_training)
        video = torch.cat(blocks, dim=1)[:, :num_frames]  # (B, F, C, H, W) in [-1, 1]
        frames = self.video_processor.postprocess_video(video.permute(0, 2, 1, 3, 4).float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return MCVDPipelineOutput(frames=frames)
