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

OUTPUT_TYPES = ("pt", "np", "pil", "latent")
# The schedulers this pipeline's loop drives exactly: each returns the video a perfect UNet predicts
# (tests/test_pipeline.py). Refused: sigma-space ones (EDM, consistency models), which would get wrong
# timesteps, and DEIS, PNDM, SA-Solver and TCD, which stop one step short of a clean sample.
SUPPORTED_SCHEDULERS = (
    "DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "LCMScheduler",
)
WEIGHTS_NAME = "diffusion_pytorch_model"


@dataclass
class MCVDPipelineOutput(BaseOutput):
    """``frames``: "pt" (B, F, C, H, W) in [0, 1]; "np" (B, F, H, W, C) in [0, 1]; "pil" B lists of F images;
    "latent" (B, F, C, H, W) in [-1, 1], the denoised sample as the UNet works on it."""

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


def unet_weight_files(unet_dir: str, variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The UNet weight files ``from_pretrained`` loads, picked as diffusers does: safetensors (whole or sharded)
    unless ``use_safetensors=False``, else ``.bin``; only those of ``variant`` when one is named."""
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
    folder, configs = str(folder), {}
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                configs[name] = json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder} is not a complete saved MCVDPipeline: {name} is missing") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is corrupt (not valid JSON: {e})") from e
    unet_dir = os.path.join(folder, "unet")
    verify_checksums(folder)  # exports record them; a folder without checksums.json skips this
    found = {}
    for name in unet_weight_files(unet_dir, variant, use_safetensors):
        found.update(_weight_shapes(os.path.join(unet_dir, name)))
    try:
        with torch.device("meta"):  # names and shapes only: no memory, no initialization
            unet = MCVDUNet2DModel.from_config(configs["unet/config.json"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{unet_dir}/config.json does not describe an MCVDUNet2DModel ({e})") from e
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    check_tensor_names(f"{unet_dir} (its weight files)", found, expected)


def _is_count(value) -> bool:
    """An integer >= 1: Python or numpy integers, not bools or floats."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


class MCVDPipeline(DiffusionPipeline):
    r"""Masked Conditional Video Diffusion on top of an ``MCVDUNet2DModel``: given ``num_past_frames`` frames, it
    generates the next ``num_frames``, one block of ``num_current_frames`` at a time, the conditioning window sliding
    onto each generated block (MCVD's autoregressive rollout). ``default_num_inference_steps`` and
    ``default_num_frames`` (saved in model_index.json; None: one block) are what a call that names none uses: trained
    pipelines ship 10 frames, so that a model of 2 frames per pass still answers ``pipe(past)`` with the next 10."""

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

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
        """Reads model_index.json, naming this class's own classes where an export names its remote code's copies
        (for plain diffusers): no code from the folder runs."""
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
                path = snapshot_download(repo_id=path, revision=kwargs.pop("revision", None),
                                         token=kwargs.pop("token", None), cache_dir=kwargs.get("cache_dir"),
                                         local_files_only=kwargs.pop("local_files_only", False))
            except Exception as e:  # offline, unknown repo, bad id: huggingface_hub raises several kinds
                raise FileNotFoundError(f"{path} is neither a local folder nor a Hub repo that could be downloaded "
                                        f"({type(e).__name__}: {e})") from e
        check_pipeline_folder(path, kwargs.get("variant"), kwargs.get("use_safetensors"))
        pipe = super().from_pretrained(path, **kwargs)
        check_finite(f"{path}/unet", pipe.unet.state_dict())
        return pipe

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the last call, over all blocks (the count ``callback_on_step_end``'s index runs to)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from a callback) to skip the remaining denoising steps."""
        return self._interrupt

    def _as_batch(self, frames, name: str):
        """Numpy arrays as tensors, and a list as one batch, as diffusers' VideoProcessor reads lists: a list of PIL
        images is one video; any other list holds videos ((F, H, W), (F, C, H, W), a list of PIL images) or batches
        of videos ((B, F, C, H, W); for a grey model also (B, F, H, W), since its frames cannot have F channels),
        joined in order. Other values (None among them) unchanged, for check_inputs to name."""
        if isinstance(frames, np.ndarray):
            return torch.from_numpy(frames)
        if not isinstance(frames, (list, tuple)):
            return frames
        if len(frames) == 0:
            raise ValueError(f"{name} is an empty list; pass at least one video")
        if all(isinstance(frame, PIL.Image.Image) for frame in frames):
            frames = [frames]
        batches = []
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
            grey_batch = video.ndim == 4 and self.unet.frame_shape[0] == 1 and video.shape[1] != 1
            batches.append(video if video.ndim == 5 or grey_batch else video[None])
        layouts = sorted({(tuple(v.shape[1:]), str(v.dtype)) for v in batches})
        if len(layouts) > 1:
            raise ValueError(f"{name}: the videos of a list must share one shape and dtype, got "
                             + ", ".join(f"{shape} {dtype}" for shape, dtype in layouts))
        return torch.cat(batches)

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
        """Every check of a call, before any work (frames as ``_as_batch`` returns them); returns the video count."""
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
            frames = math.ceil(num_frames / cfg.num_current_frames) * cfg.num_current_frames
            expected, device = (total, frames, *self.unet.frame_shape), self._execution_device
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
        return int(total)

    def prepare_frames(self, frames, num_videos_per_prompt: int) -> torch.Tensor | None:
        """Checked frames as (B * num_videos_per_prompt, F, C, H, W) in [-1, 1] on the UNet's device."""
        if frames is None:
            return None
        if frames.ndim == 4:
            frames = frames[:, :, None]
        frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
        frames = self.video_processor.normalize(frames).to(device=self._execution_device, dtype=self.unet.dtype)
        return frames.repeat_interleave(num_videos_per_prompt, dim=0)

    def prepare_latents(self, batch: int, num_blocks: int, generator, latents: torch.Tensor | None = None):
        """Yields each block's initial noise: ``latents`` a block at a time, else drawn when the block starts (so
        that the first blocks of a long rollout are those of a short one with the same generator)."""
        frames = self.unet.config.num_current_frames
        for block in range(num_blocks):
            if latents is not None:
                yield latents[:, block * frames:(block + 1) * frames]
            else:
                yield randn_tensor((batch, frames, *self.unet.frame_shape), generator=generator,
                                   device=self._execution_device, dtype=self.unet.dtype)

    def prepare_extra_step_kwargs(self, generator, eta):
        """eta (DDIM) and generator, for the schedulers whose step() takes them."""
        params = inspect.signature(self.scheduler.step).parameters
        return {name: value for name, value in (("eta", eta), ("generator", generator)) if name in params}

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
        """No dropout while sampling, also for a model handed over mid-training (its mode is restored after); no
        ``interrupt`` pending."""
        self._interrupt = False
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

    def denoise_block(self, noise, past, future, block, extra_step_kwargs, progress_bar, callback_on_step_end=None,
                      callback_on_step_end_tensor_inputs=("latents",)):
        """Denoises block number ``block`` from its initial noise; the callback's step index counts over all blocks."""
        if block > 0:  # the same timesteps set again: that resets multistep schedulers' history
            self.scheduler.set_timesteps(self.scheduler.num_inference_steps, device=self._execution_device)
        latents = noise * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.scheduler.timesteps):
            if self.interrupt:
                continue
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.unet(model_input, t, past_frames=past, future_frames=future).sample
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
            if callback_on_step_end is not None:
                callback_kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    callback_kwargs[name] = locals()[name]
                step = block * len(self.scheduler.timesteps) + i
                latents = (callback_on_step_end(self, step, t, callback_kwargs) or {}).pop("latents", latents)
            progress_bar.update()
        return latents

    def postprocess(self, blocks: list[torch.Tensor], num_frames: int, output_type: str):
        """The generated blocks as ``output_type`` asks: "latent" as they are, (B, F, C, H, W) in [-1, 1]; else
        through the VideoProcessor."""
        video = torch.cat(blocks, dim=1)[:, :num_frames]
        if output_type == "latent":
            return video
        return self.video_processor.postprocess_video(video.permute(0, 2, 1, 3, 4).float(), output_type)

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
            past_frames: P = ``num_past_frames`` per video, (B, P[, C], H, W) in [0, 1] or uint8, torch or numpy,
                or a list of B videos (PIL images too). None: generation (models trained with past masking).
            future_frames: like ``past_frames``, ``num_future_frames`` frames after the gap: interpolation.
            num_frames: default ``config.default_num_frames``, else one block; more blocks roll out autoregressively.
            num_inference_steps: steps per block; default ``config.default_num_inference_steps``.
            generator: one ``torch.Generator``, or one per generated video.
            batch_size: videos to generate when ``past_frames`` is None (default 1).
            num_videos_per_prompt: futures drawn per input video, kept together in the output.
            eta: DDIM's eta (0: deterministic); ignored by schedulers without it.
            latents: every block's initial noise, (videos, blocks x ``num_current_frames``, C, H, W), UNet dtype/device.
            output_type: "pt", "np", "pil", or "latent" (the denoised sample in [-1, 1], not post-processed).
            return_dict: False returns the tuple ``(frames,)``.
            callback_on_step_end: ``fn(pipe, i, t, kwargs)`` after each step, i over all blocks; a dict it returns
                replaces those tensors (``PipelineCallback`` objects name their own).
            callback_on_step_end_tensor_inputs: the tensors it gets, of ``_callback_tensor_inputs``.
        """
        # 0. Defaults, and the tensors a PipelineCallback names
        num_frames, num_inference_steps, callback_on_step_end_tensor_inputs = self._resolve_defaults(
            num_frames, num_inference_steps, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 1. Check inputs (a list of videos is stacked first, to be checked as a batch)
        past_frames = self._as_batch(past_frames, "past_frames")
        future_frames = self._as_batch(future_frames, "future_frames")
        batch = self.check_inputs(past_frames, future_frames, num_frames, num_inference_steps, batch_size,
                                  num_videos_per_prompt, output_type, generator, latents, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs)

        # 2. Conditioning frames in [-1, 1], each repeated num_videos_per_prompt times
        past, future = (self.prepare_frames(frames, num_videos_per_prompt) for frames in (past_frames, future_frames))

        # 3. Timesteps (set again before every later block)
        self.scheduler.set_timesteps(int(num_inference_steps), device=self._execution_device)
        num_blocks = math.ceil(num_frames / self.unet.config.num_current_frames)
        self._num_timesteps = num_blocks * len(self.scheduler.timesteps)

        # 4. The scheduler's extra step arguments (the initial noise is drawn as each block starts)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoise block by block; each block's frames become the next block's past
        blocks = []
        with self._sampling_mode(), self.progress_bar(total=self._num_timesteps) as progress_bar:
            for block, noise in enumerate(self.prepare_latents(batch, num_blocks, generator, latents)):
                blocks.append(self.denoise_block(noise, past, future, block, extra_step_kwargs, progress_bar,
                                                 callback_on_step_end, callback_on_step_end_tensor_inputs))
                past = self.slide_past(past, blocks[-1])

        # 6. Post-process
        frames = self.postprocess(blocks, num_frames, output_type)
        self.maybe_free_model_hooks()
        return MCVDPipelineOutput(frames=frames) if return_dict else (frames,)
