"""MCVDPipeline: video prediction, unconditional generation and interpolation with any diffusers scheduler."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from .integrity import check_finite, check_tensor_names, verify_checksums
from .unet.unet_mcvd import MCVDUNet2DModel

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


WEIGHTS_NAME = "diffusion_pytorch_model"


def unet_weight_files(unet_dir: str, variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The UNet weight files ``from_pretrained`` loads, as diffusers picks them: safetensors (whole or sharded)
    unless ``use_safetensors=False``, else PyTorch ``.bin`` files (when ``use_safetensors`` is not True); only
    those of ``variant`` (``diffusion_pytorch_model.fp16.safetensors``) when one is named."""
    infix = "" if variant is None else re.escape(f".{variant}")
    names = sorted(os.listdir(unet_dir))
    for extension, allowed in (("safetensors", use_safetensors is not False), ("bin", use_safetensors is not True)):
        pattern = re.compile(rf"{WEIGHTS_NAME}{infix}(-\d{{5}}-of-\d{{5}})?\.{extension}")
        found = [name for name in names if pattern.fullmatch(name)]
        if allowed and found:
            return found
    if variant is not None:  # diffusers' own error for a variant a folder lacks
        raise ValueError(f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                         f"files are available in {unet_dir} (found: {', '.join(names)})")
    kinds = {True: ".safetensors", False: ".bin", None: ".safetensors or .bin"}[use_safetensors]
    raise FileNotFoundError(f"{unet_dir} holds no {kinds} weight file ({WEIGHTS_NAME}{kinds.split(' or ')[0]})")


def _weight_shapes(path: str) -> dict[str, tuple]:
    """Tensor name -> shape of one weight file; a .bin is read with weights_only (no code runs)."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return {key: tuple(value.shape) for key, value in state.items()}


def check_pipeline_folder(folder: str | os.PathLike, variant: str | None = None,
                          use_safetensors: bool | None = None) -> None:
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
    verify_checksums(folder)  # exports record them; a folder without checksums.json skips this
    weights = unet_weight_files(unet_dir, variant, use_safetensors)
    found = {}
    for name in weights:
        found.update(_weight_shapes(os.path.join(unet_dir, name)))
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
        check_pipeline_folder(path, kwargs.get("variant"), kwargs.get("use_safetensors"))
        pipe = super().from_pretrained(path, **kwargs)
        check_finite(f"{path}/unet", pipe.unet.state_dict())
        return pipe

    _callback_tensor_inputs = ["latents"]

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the last call, over all blocks (the count ``callback_on_step_end``'s index runs to)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from a callback) to skip the remaining denoising steps."""
        return self._interrupt

    # ------------------------------------------------------------------ inputs
    def _as_batch(self, frames, name: str):
        """Numpy arrays as tensors, and a list of videos (each a tensor or array of (F, H, W) or (F, C, H, W), or a
        list of PIL images) as one batch; other values unchanged, for check_inputs to name."""
        if isinstance(frames, np.ndarray):
            return torch.from_numpy(frames)
        if not isinstance(frames, (list, tuple)):
            return frames
        if len(frames) == 0:
            raise ValueError(f"{name} is an empty list; pass at least one video")
        videos = []
        for video in frames:
            if isinstance(video, (list, tuple)) and video and all(isinstance(f, PIL.Image.Image) for f in video):
                modes = {frame.mode for frame in video}
                if modes - {"L", "RGB"}:
                    raise ValueError(f"{name}: PIL frames must be mode L (grey) or RGB, got {sorted(modes)}")
                array = self.video_processor.pil_to_numpy(list(video))  # (F, H, W[, C]) float in [0, 1]
                video = torch.from_numpy(array if array.ndim == 4 else array[..., None]).permute(0, 3, 1, 2)
            elif isinstance(video, np.ndarray):
                video = torch.from_numpy(video)
            if not isinstance(video, torch.Tensor):
                raise ValueError(f"{name}: each video of a list must be a tensor, a numpy array or a list of PIL "
                                 f"images, got {type(video).__name__}")
            videos.append(video)
        layouts = sorted({(tuple(v.shape), str(v.dtype)) for v in videos})
        if len(layouts) > 1:
            raise ValueError(f"{name}: the videos of a list must share one shape and dtype, got "
                             + ", ".join(f"{shape} {dtype}" for shape, dtype in layouts))
        return torch.stack(videos)

    def _check_frames(self, frames, name: str, count: int) -> int:
        """Checks user frames as ``_as_batch`` returns them; returns the number of videos."""
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or numpy array (or a list of videos), got "
                             f"{type(frames).__name__}")
        channels, height, width = self.unet.frame_shape
        shape = tuple(frames.shape)
        if frames.ndim == 4 and channels == 1:
            shape = (*shape[:2], 1, *shape[2:])
        if len(shape) != 5:
            raise ValueError(f"{name} must have shape (B, {count}, H, W) or (B, {count}, C, H, W), got {shape}")
        if shape[0] == 0:
            raise ValueError(f"{name} holds no videos (a batch of 0, shape {shape}); pass at least one")
        if shape[1] != count:
            raise ValueError(f"{name} must hold {count} frames per video (this model's layout), got {shape[1]}")
        if shape[2:] != (channels, height, width):
            raise ValueError(f"{name} frames must be {channels}x{height}x{width} (C x H x W), got "
                             f"{'x'.join(map(str, shape[2:]))}; resize them yourself, the pipeline does not")
        if frames.is_floating_point():
            if not torch.isfinite(frames).all():
                raise ValueError(f"{name} contains NaN or infinite values")
            low, high = frames.min().item(), frames.max().item()
            if low < 0 or high > 1:
                raise ValueError(f"float {name} must lie in [0, 1], got values in [{low:.3g}, {high:.3g}] "
                                 "(pass uint8 for 0..255)")
        elif frames.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 (0..255) or float (0..1), got {frames.dtype}")
        return shape[0]

    def check_inputs(self, past_frames, future_frames, num_frames, num_inference_steps, batch_size,
                     num_videos_per_prompt, output_type, generator, latents, callback_on_step_end,
                     callback_on_step_end_tensor_inputs):
        """Every check of a call, before any work: frames as ``_as_batch`` returns them."""
        cfg = self.unet.config
        if type(self.scheduler).__name__ not in SUPPORTED_SCHEDULERS:
            raise ValueError(f"{type(self.scheduler).__name__} is not supported by MCVDPipeline: it does not sample "
                             f"this model's discrete-timestep diffusion exactly. Use one of {list(SUPPORTED_SCHEDULERS)}"
                             ", e.g. DDIMScheduler.from_config(pipe.scheduler.config)")
        for name, value in (("num_inference_steps", num_inference_steps), ("num_frames", num_frames),
                            ("num_videos_per_prompt", num_videos_per_prompt)):
            if not _is_count(value):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if batch_size is not None and not _is_count(batch_size):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if past_frames is None:
            if not self.unet.can_generate_without_past:
                raise ValueError("past_frames=None asks for unconditional generation, but this model was trained "
                                 "without past masking (prob_mask_past=0): pass past_frames")
            if num_frames > cfg.num_current_frames and not self.unet.can_roll_out_without_past:
                raise ValueError(f"an unconditional rollout beyond one block needs num_current_frames "
                                 f"({cfg.num_current_frames}) >= num_past_frames ({cfg.num_past_frames}) or a model "
                                 f"trained with partial_past_mask; ask for at most {cfg.num_current_frames} frames")
            batch = batch_size or 1
        else:
            batch = self._check_frames(past_frames, "past_frames", cfg.num_past_frames)
            if batch_size not in (None, batch):
                raise ValueError(f"batch_size={batch_size} but past_frames holds {batch} videos")
        if future_frames is not None:
            if cfg.num_future_frames == 0:
                raise ValueError("future_frames given, but this model was not trained for interpolation "
                                 "(num_future_frames=0)")
            if num_frames != cfg.num_current_frames:
                raise ValueError(f"interpolation fills exactly num_current_frames={cfg.num_current_frames} frames; "
                                 f"got num_frames={num_frames}")
            future_batch = self._check_frames(future_frames, "future_frames", cfg.num_future_frames)
            if future_batch != batch:
                raise ValueError(f"future_frames holds {future_batch} videos, expected {batch}")
        elif not self.unet.can_generate_without_future:
            raise ValueError(f"this model always saw {cfg.num_future_frames} future frames in training "
                             "(prob_mask_future=0): pass future_frames")
        total = batch * num_videos_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"got a list of {len(generator)} generators for {total} videos ({batch} x "
                             f"num_videos_per_prompt={num_videos_per_prompt}); pass one generator, or one per video")
        if latents is not None:
            expected = (total, math.ceil(num_frames / cfg.num_current_frames) * cfg.num_current_frames,
                        *self.unet.frame_shape)
            device = self._execution_device
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                raise ValueError(f"latents must be a tensor of shape {expected} (videos, blocks x "
                                 f"{cfg.num_current_frames} frames, C, H, W): the noise of every block, got "
                                 f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
            if latents.dtype != self.unet.dtype or latents.device.type != device.type or (
                    device.index is not None and latents.device.index != device.index):
                raise ValueError(f"latents must be {self.unet.dtype} on {device} like the UNet, got "
                                 f"{latents.dtype} on {latents.device}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got "
                             f"{unknown}")

    def prepare_frames(self, frames, num_videos_per_prompt: int) -> torch.Tensor | None:
        """Frames as ``_as_batch`` returned them and ``check_inputs`` passed them, as
        (B * num_videos_per_prompt, F, C, H, W) in [-1, 1] on the UNet's device."""
        if frames is None:
            return None
        if frames.ndim == 4:
            frames = frames[:, :, None]
        frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
        frames = self.video_processor.normalize(frames).to(device=self._execution_device, dtype=self.unet.dtype)
        return frames.repeat_interleave(num_videos_per_prompt, dim=0)

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
    def _resolve_defaults(self, num_frames, num_inference_steps, callback_on_step_end, tensor_inputs):
        """What a call leaves None: the pipeline's frame and step counts; the tensors a callback object names."""
        if num_frames is None:
            num_frames = self.config.get("default_num_frames") or self.unet.config.num_current_frames
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs
        return num_frames, num_inference_steps, tensor_inputs or ["latents"]

    @contextlib.contextmanager
    def _sampling_mode(self):
        """No dropout while sampling, also for a model handed over mid-training; its mode is restored after."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            yield
        finally:
            self.unet.train(was_training)

    def slide_past(self, past: torch.Tensor | None, block: torch.Tensor) -> torch.Tensor | None:
        """The conditioning window after a generated block: the last ``num_past_frames`` of past + block; zeros
        (a masked past) before the first generated frame when there was no past (generation)."""
        num_past = self.unet.config.num_past_frames
        if num_past == 0:
            return past
        if past is None:
            past = block.new_zeros(len(block), num_past, *self.unet.frame_shape)
        return torch.cat([past, block], dim=1)[:, -num_past:]

    def denoise_block(self, latents, past, future, extra_step_kwargs, step, progress_bar, callback_on_step_end=None,
                      callback_on_step_end_tensor_inputs=("latents",)):
        """Denoises one block from its initial noise over the scheduler's timesteps; ``step`` counts the steps of
        all blocks so far (what the callback sees). Returns the block and the new step count."""
        for t in self.scheduler.timesteps:
            if self.interrupt:
                continue
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.unet(model_input, t, past_frames=past, future_frames=future).sample
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
            if callback_on_step_end is not None:
                callback_kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    callback_kwargs[name] = locals()[name]
                outputs = callback_on_step_end(self, step, t, callback_kwargs) or {}
                latents = outputs.pop("latents", latents)
            step += 1
            progress_bar.update()
        return latents, step

    @torch.no_grad()
    def __call__(
        self,
        past_frames: torch.Tensor | np.ndarray | list | None = None,
        future_frames: torch.Tensor | np.ndarray | list | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MCVDPipelineOutput | tuple:
        r"""Generates video frames.

        Args:
            past_frames: (B, P, H, W) or (B, P, C, H, W), float in [0, 1] or uint8, torch or numpy, with
                P = ``unet.config.num_past_frames``; or a list of B videos, each (P, H, W) / (P, C, H, W) or a
                list of P PIL images. None: unconditional generation (models trained with past masking).
            future_frames: like ``past_frames`` with F = ``num_future_frames`` frames: interpolation.
            num_frames: frames to generate; default ``config.default_num_frames`` (trained pipelines: 10),
                else one block (``num_current_frames``). More than one block rolls out autoregressively;
                the last block is cut to the requested count.
            num_inference_steps: denoising steps per block; default ``config.default_num_inference_steps``.
            generator: one ``torch.Generator``, or one per generated video, for reproducible results.
            batch_size: videos to generate when ``past_frames`` is None (default 1).
            num_videos_per_prompt: futures drawn for every input video; outputs keep each input's futures together.
            eta: DDIM's eta (0 = deterministic DDIM); ignored by schedulers without it.
            latents: the initial noise of every block, (videos, blocks x ``num_current_frames``, C, H, W), in the
                UNet's dtype and on its device; default drawn with ``generator``.
            output_type: "pt", "np" or "pil".
            callback_on_step_end: called after every denoising step as ``fn(pipe, i, t, callback_kwargs)``, i
                counting steps over all blocks (up to ``pipe.num_timesteps``); a dict it returns replaces the named
                tensors, e.g. ``{"latents": ...}``. ``PipelineCallback`` objects name their own tensors.
            callback_on_step_end_tensor_inputs: tensors handed to the callback, of ``_callback_tensor_inputs``.
        """
        # 0. Defaults
        cfg = self.unet.config
        num_frames, num_inference_steps, callback_on_step_end_tensor_inputs = self._resolve_defaults(
            num_frames, num_inference_steps, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 1. Check inputs (lists of videos stacked first, so that they are checked like a batch)
        past_frames = past_frames if past_frames is None else self._as_batch(past_frames, "past_frames")
        future_frames = future_frames if future_frames is None else self._as_batch(future_frames, "future_frames")
        self.check_inputs(past_frames, future_frames, num_frames, num_inference_steps, batch_size,
                          num_videos_per_prompt, output_type, generator, latents, callback_on_step_end,
                          callback_on_step_end_tensor_inputs)
        num_frames, num_inference_steps = int(num_frames), int(num_inference_steps)  # numpy integers too
        self._interrupt = False

        # 2. Conditioning frames in [-1, 1], each repeated num_videos_per_prompt times
        past = self.prepare_frames(past_frames, num_videos_per_prompt)
        future = self.prepare_frames(future_frames, num_videos_per_prompt)
        batch = len(past) if past is not None else int(batch_size or 1) * num_videos_per_prompt
        device, dtype = self._execution_device, self.unet.dtype

        # 3. Timesteps (set again before every later block: it resets multistep schedulers' history)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        num_blocks = math.ceil(num_frames / cfg.num_current_frames)
        self._num_timesteps = num_blocks * len(self.scheduler.timesteps)

        # 4. Initial noise: the given latents, one block each, or drawn when a block starts (so that the first
        # blocks of a long rollout are those of a short one with the same generator)
        block_shape = (batch, cfg.num_current_frames, *self.unet.frame_shape)
        given = None if latents is None else latents.split(cfg.num_current_frames, dim=1)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoise block by block; each block's frames become the next block's past
        blocks, step = [], 0
        with self._sampling_mode(), self.progress_bar(total=self._num_timesteps) as progress_bar:
            for block in range(num_blocks):
                if block > 0:
                    self.scheduler.set_timesteps(num_inference_steps, device=device)
                latents = given[block] if given is not None else randn_tensor(
                    block_shape, generator=generator, device=device, dtype=dtype)
                latents, step = self.denoise_block(
                    latents * self.scheduler.init_noise_sigma, past, future, extra_step_kwargs, step,
                    progress_bar, callback_on_step_end, callback_on_step_end_tensor_inputs)
                blocks.append(latents)
                past = self.slide_past(past, latents)

        # 6. Post-process
        video = torch.cat(blocks, dim=1)[:, :num_frames]  # (B, F, C, H, W) in [-1, 1]
        frames = self.video_processor.postprocess_video(video.permute(0, 2, 1, 3, 4).float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return MCVDPipelineOutput(frames=frames)
