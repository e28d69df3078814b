"""The training config: one dataclass of every option, read from YAML/JSON files and command-line
overrides, validated once where it is built, and the rules for resuming a run with another config."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .data.moving_mnist import BOUNCES, MOTIONS
from .lr_schedules import LR_SCHEDULES
from .unet.unet_mcvd import PRESETS, MCVDUNet2DModel
from .runtime import CHOICES_TEXT, PRECISION_CHOICES
from .schedulers import BETA_SCHEDULES, PREDICTION_TYPES, SamplerSpec, make_noise_scheduler


def key(default=dataclasses.MISSING, help: str = ""):
    """A config key: its default and its help text (field metadata, which the command line shows); lists are copied."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def allowed_types(cls, key: str) -> tuple[object, tuple]:
    hint = typing.get_type_hints(cls)[key]
    return hint, (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))


def coerce(cls, key: str, value):
    """Checks a config value against the field's type; text (a command line) is read as YAML scalars.
    A type with a ``parse`` classmethod (``SamplerSpec``) parses its text form."""
    hint, allowed = allowed_types(cls, key)
    if type(None) in allowed and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    for t in allowed:
        if hasattr(t, "parse") and isinstance(value, (str, t)):
            try:
                return t.parse(value)
            except ValueError as e:
                raise ValueError(f"{key} must be {getattr(t, 'FORMAT', t.__name__)} ({e})") from None
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str) \
            and any(typing.get_origin(t) is list for t in allowed) and value[0].startswith("["):
        value = yaml.safe_load(value[0])  # --block_out_channels "[64, 128, 128]"
    if isinstance(value, str) and str not in allowed:
        value = yaml.safe_load(value)
        if isinstance(value, str) and float in allowed:  # YAML reads "1e-3" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
    for t in allowed:
        if typing.get_origin(t) is list:
            (item,) = typing.get_args(t)
            if isinstance(value, (list, tuple)):
                items = [yaml.safe_load(v) if isinstance(v, str) and item is not str else v for v in value]
                if all(isinstance(v, item) and not isinstance(v, bool) for v in items):
                    return items
        elif t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        elif t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise ValueError(f"config key {key!r} expects {hint}, got {value!r}")


# The default export_sampler, so that pipe(past) samples well as it comes: on the quickstart model DDIM-50
# (trailing, x0 clipped) beat DPM-Solver++-20 (MSE 0.050 vs 0.066).
EXPORT_SAMPLER = SamplerSpec("ddim", 50)
# Lower bounds of keys, each checked as "<key> must be >= <bound>".
MINIMUMS = {"num_digits": 1, "num_train_timesteps": 2, "batch_size": 1, "gradient_accumulation_steps": 1,
            "max_steps": 1, "warmup_steps": 0, "plateau_patience": 0, "plateau_threshold": 0, "validate_every": 0,
            "val_rollout_clips": 0, "sample_every": 0, "checkpoint_every": 0, "log_every": 1}


@dataclass
class TrainConfig:
    """Every training option. Configs are plain YAML/JSON dicts of these keys."""

    # model: a preset from unet/unet_mcvd.py and MCVD's frame layout
    preset: str = key("tiny", "the UNet's preset (unet/unet_mcvd.py): tiny, cpu, fast or paper")
    num_past_frames: int = key(5, "conditioning frames")
    num_current_frames: int = key(10, "frames predicted per denoising block")
    num_future_frames: int = key(0, "> 0: future-conditioning slots (interpolation)")
    prob_mask_past: float = key(0.0, "MCVD masking: > 0 also teaches unconditional generation")
    prob_mask_future: float = key(0.0, "> 0 lets an interpolation model also predict")
    patch_size: int | None = key(None, "space-to-depth factor of the UNet's input; None: the preset's")
    block_out_channels: list[int] | None = key(None, "the UNet's width per level; None: the preset's")
    partial_past_mask: bool = key(False, "a masked past keeps its last k frames (none for half the masked samples, "
                                  "else k uniform in 1..num_past_frames-1), so unconditional generation can roll out "
                                  "block by block with fewer current than past frames; needs prob_mask_past > 0")
    init_unet_from: str | None = key(None, "warm start from a pipeline or UNet folder of the same architecture "
                                     "(num_future_frames may grow: new slots start at zero); ignored when resuming")
    # data: Moving MNIST drawn fresh each step from MNIST train digits
    mnist_root: str | None = key(None, "a folder, \"bundled\", or None ($MCVD_MNIST_DIR, else download)")
    image_size: int = key(64, "frame size in pixels")
    num_digits: int = key(2, "digits per clip")
    motion: str = key("deterministic", "or \"stochastic\" (velocity redrawn at each bounce)")
    bounce: str = key("clamp", "walls as the standard generator (clamp to the wall, truncated positions) or "
                      "\"elastic\" (mirror reflection, rounded: this project's generator before test-set format 3)")
    # diffusion
    beta_schedule: str = key("cosine", "or \"linear\" (MCVD's 1e-4..0.02)")
    # v-prediction by default: with trailing timesteps sampling starts at t=T-1, where a cosine
    # schedule leaves SNR ~1e-9; an epsilon model's x0 estimate there is its error times ~1e4.
    prediction_type: str = key("v_prediction", "or \"epsilon\" (MCVD), \"sample\"")
    num_train_timesteps: int = key(1000, "steps of the training noise schedule")
    noise_shift: float = key(1.0, "> 1 divides every step's SNR by noise_shift^2 (\"simple diffusion\" shift)")
    min_snr_gamma: float | None = key(None, "Min-SNR loss weighting (Hang et al. 2023; 5.0 is usual); None: off")
    past_noise_augment: float = key(0.0, "context noise augmentation (as in GameNGen): each training clip's past "
                                    "frames get Gaussian noise of std uniform in [0, this] (data in [-1, 1]), so a "
                                    "rollout conditioned on its own imperfect frames stays in distribution; 0: off")
    train_on_sampler_timesteps: bool = key(False, "true: training and the validation loss draw timesteps only "
                                           "from export_sampler's grid (ddim:5: 999, 799, 599, 399, 199): a short run "
                                           "trains only the noise levels its sampler uses, for that sampler alone")
    # optimization
    batch_size: int = key(64, "per process and per micro-batch")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step")
    max_steps: int = key(10000, "optimizer steps")
    learning_rate: float = key(2e-4, "AdamW's peak learning rate")
    adam_beta1: float = key(0.9, "AdamW's first-moment decay")
    adam_beta2: float = key(0.999, "AdamW's second-moment decay; 0.99 tracks the gradient's scale faster, which "
                                   "steadies short runs at high learning rates")
    grad_clip: float = key(1.0, "the gradient norm is clipped to this")
    ema_decay: float = key(0.999, "the ceiling; EMA warms up towards it (diffusers EMAModel, power 2/3)")
    mixed_precision: str = key("auto", "auto: bf16 where the hardware runs it natively (a CUDA GPU that supports "
                               "it, a CPU with AVX512-BF16 or AMX), else fp32; or \"no\" (= \"fp32\"), \"bf16\", "
                               "\"fp16\" (Accelerate's; fp16 with loss scaling, CUDA only)")
    lr_scheduler: str = key("warmup_plateau", "\"warmup_plateau\" (linear warm-up, then ReduceLROnPlateau on the "
                            "validation loss) or a diffusers one: constant, constant_with_warmup, linear, cosine, ...")
    warmup_steps: int = key(500, "linear warm-up of the learning rate")
    plateau_factor: float = key(0.5, "LR multiplier at each plateau")
    plateau_patience: int = key(3, "validations without improvement tolerated before a cut")
    plateau_threshold: float = key(0.01, "relative improvement that counts")
    min_lr: float = key(1e-6, "the plateau cuts stop here")
    # validation: clips from MNIST validation digits, fixed noise and timesteps, EMA weights
    validate_every: int = key(500, "optimizer steps; 0: never (then the last weights are exported)")
    val_clips: int = key(256, "fixed validation clips")
    val_batch_size: int = key(64, "clips per validation batch")
    val_rollout_clips: int = key(32, "validation clips (at most val_clips) whose next 10 frames are predicted "
                                 "(block by block, with sample_sampler) and scored (MSE, SSIM) at each validation, so "
                                 "models of any block size are compared on the task; 0: off")
    # prediction GIFs on fixed validation clips
    sample_every: int = key(1000, "0: never")
    sample_clips: int = key(4, "validation clips shown in each GIF")
    sample_sampler: SamplerSpec = key(EXPORT_SAMPLER, "NAME:STEPS, a sampler of mcvd_diffusers.SAMPLERS")
    export_sampler: SamplerSpec = key(EXPORT_SAMPLER, "the sampler exported pipelines ship with: their "
                                      "scheduler, and STEPS as their default step count")
    # fast paths (mcvd_diffusers/runtime.py), off by default
    channels_last: bool = key(False, "NHWC convolutions")
    compile: bool = key(False, "torch.compile the UNet; falls back to eager with a warning where unsupported")
    fused_adamw: bool = key(False, "one fused AdamW kernel instead of a loop over parameters")
    seed: int = key(0, "weights, and (with the process index) each process's data and noise")
    # checkpoints
    checkpoint_every: int = key(1000, "optimizer steps, and always at the end; 0: only at the end")
    checkpoints_total_limit: int | None = key(3, "keep the newest N; None: keep all")
    resume_from_checkpoint: str | None = key(None, "\"latest\" (or a fresh start when there is none) or a folder")
    # output and logging
    output_dir: str = key("runs/mcvd", "the run folder: checkpoints, best/, pipeline/, samples/, logs/")
    overwrite: bool = key(False, "replace an output_dir that holds another run")
    log_every: int = key(50, "optimizer steps between logged losses")
    report_to: str = key("tensorboard", "or \"none\"")
    # Hugging Face Hub
    push_to_hub: bool = key(False, "upload the exported pipeline and its card to hub_model_id at the end")
    hub_model_id: str | None = key(None, "the Hub repo to push to, \"user/name\"")
    hub_private: bool = key(False, "create the Hub repo private")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = drop_removed_keys(values)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(fields)}")
        if isinstance(values.get("mixed_precision"), bool):  # YAML 1.1 reads an unquoted `no` (or off) as false
            if values["mixed_precision"]:
                raise ValueError(f"invalid training config: mixed_precision must be one of {CHOICES_TEXT}, got true")
            values = {**values, "mixed_precision": "no"}
        return cls(**{k: coerce(cls, k, v) for k, v in values.items()})  # validated by __post_init__

    def to_dict(self) -> dict:
        """Plain data (YAML/JSON): samplers as NAME:STEPS."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: str(v) if isinstance(v, SamplerSpec) else list(v) if isinstance(v, list) else v
                for k, v in values.items()}

    def __post_init__(self) -> None:
        if self.mixed_precision == "fp32":
            self.mixed_precision = "no"  # one spelling of fp32 (Accelerate's), in the config a run records
        for key in ("sample_sampler", "export_sampler"):  # NAME:STEPS from the Python API, parsed once here
            setattr(self, key, SamplerSpec.parse(getattr(self, key)))
        self.validate()

    def validate(self) -> None:
        """The one check of every value a user enters (a config file, the command line, the Python API)."""
        errors = [message for ok, message in self._checks() if not ok]
        errors += [f"{k} must be >= {bound}" for k, bound in MINIMUMS.items() if getattr(self, k) < bound]
        # inf and NaN pass every comparison above that they should fail (inf > 0; NaN compares false both ways)
        errors += [f"{f.name} must be a finite number, got {getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        path = Path(self.output_dir)  # an output_dir that is, or lies inside, an existing file can never hold a run
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            errors.append(f"output_dir {self.output_dir} cannot be created: {existing} is a file, not a folder")
        if self.hub_model_id is not None:
            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError as e:
                errors.append(f"hub_model_id {self.hub_model_id!r} is not a valid Hub repo id: {e}")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    def _checks(self) -> list[tuple[bool, str]]:
        """(ok, message) for every key but the lower bounds of MINIMUMS."""
        preset = PRESETS.get(self.preset, {"block_out_channels": [1]})
        levels, patch = len(preset["block_out_channels"]), max(self.patch_size or preset.get("patch_size", 1), 1)
        groups = preset.get(  # GroupNorm splits every level's channels into these groups
            "norm_num_groups", inspect.signature(MCVDUNet2DModel.__init__).parameters["norm_num_groups"].default)
        return [
            (self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}"),
            (self.num_past_frames >= 0 and self.num_current_frames >= 1 and self.num_future_frames >= 0,
             "frame counts must be num_past_frames >= 0, num_current_frames >= 1, num_future_frames >= 0"),
            (0 <= self.prob_mask_past <= 1 and 0 <= self.prob_mask_future <= 1, "mask probabilities must be in [0, 1]"),
            (self.prob_mask_past == 0 or self.num_past_frames > 0, "prob_mask_past > 0 needs num_past_frames > 0"),
            (self.prob_mask_future == 0 or self.num_future_frames > 0,
             "prob_mask_future > 0 needs num_future_frames > 0"),
            (not self.partial_past_mask or self.prob_mask_past > 0, "partial_past_mask needs prob_mask_past > 0"),
            (self.init_unet_from != "", "init_unet_from must be a folder or null"),
            (self.patch_size is None or self.patch_size >= 1, "patch_size must be >= 1 (or null: the preset's)"),
            (self.block_out_channels is None or (len(self.block_out_channels) == levels
                                                 and all(c >= 1 for c in self.block_out_channels)),
             f"block_out_channels must list {levels} positive widths, one per level of the {self.preset} preset "
             "(or null: the preset's)"),
            (self.block_out_channels is None or all(c % groups == 0 for c in self.block_out_channels),
             f"block_out_channels must be multiples of {groups}, the {self.preset} preset's norm_num_groups"),
            (self.image_size >= 28 and self.image_size % (patch * 2 ** (levels - 1)) == 0,
             f"image_size must be >= 28 and a multiple of {patch * 2 ** (levels - 1)} (patch_size {patch} x "
             f"2^{levels - 1}: the {self.preset} preset runs on a grid of image_size/{patch} and halves it "
             f"{levels - 1} times)"),
            (self.motion in MOTIONS, f"motion must be one of {MOTIONS}"),
            (self.bounce in BOUNCES, f"bounce must be one of {BOUNCES}"),
            (self.beta_schedule in BETA_SCHEDULES, f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}"),
            (self.prediction_type in PREDICTION_TYPES, f"prediction_type must be one of {PREDICTION_TYPES}"),
            (math.isfinite(self.noise_shift) and self.noise_shift > 0, "noise_shift must be a finite number > 0"),
            (self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma must be > 0 (or null: off)"),
            (0 <= self.past_noise_augment <= 1,
             "past_noise_augment must be in [0, 1] (a noise std on data in [-1, 1])"),
            # optimization, validation, checkpoints and output
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
            (0 < self.ema_decay < 1, "ema_decay must be in (0, 1)"),
            (self.mixed_precision in PRECISION_CHOICES,
             f"mixed_precision must be one of {CHOICES_TEXT}, got {self.mixed_precision!r}"),
            (self.lr_scheduler in LR_SCHEDULES, f"lr_scheduler must be one of {LR_SCHEDULES}"),
            (0 < self.plateau_factor < 1, "plateau_factor must be in (0, 1)"),
            (0 <= self.min_lr <= self.learning_rate, "min_lr must be in [0, learning_rate]"),
            (self.lr_scheduler != "warmup_plateau" or self.validate_every > 0,
             "lr_scheduler warmup_plateau needs validate_every > 0 (it acts on the validation loss)"),
            (self.val_clips >= 1 and self.val_batch_size >= 1, "val_clips and val_batch_size must be >= 1"),
            (1 <= self.sample_clips <= self.val_clips, "sample_clips must be in [1, val_clips]"),
            (not self.train_on_sampler_timesteps or self.sample_sampler == self.export_sampler,
             f"train_on_sampler_timesteps trains export_sampler's grid ({self.export_sampler}), so sample_sampler "
             f"(the validation rollout's) must be the same, got {self.sample_sampler}"),
            (self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             "checkpoints_total_limit must be >= 1 (or null: keep all)"),
            (self.resume_from_checkpoint != "", "resume_from_checkpoint must be 'latest', a folder, or null"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)"),
            (self.report_to in ("tensorboard", "none"), "report_to must be 'tensorboard' or 'none'"),
            (not self.push_to_hub or bool(self.hub_model_id), "push_to_hub needs hub_model_id ('user/name')"),
        ]


# Keys a resumed run may change: they do not alter the model, the data or the optimization.
RESUMABLE_CHANGES = {"max_steps", "init_unet_from", "mnist_root", "validate_every", "val_batch_size",
                     "val_rollout_clips", "sample_every", "sample_clips", "sample_sampler", "export_sampler",
                     "channels_last", "compile", "fused_adamw", "checkpoint_every", "checkpoints_total_limit",
                     "resume_from_checkpoint", "output_dir", "overwrite", "log_every", "report_to", "push_to_hub",
                     "hub_model_id", "hub_private"}


# Keys of earlier versions, removed with what they switched on (residual_to_last_past lost in recipe rounds 2 and 5,
# benchmarks/RESULTS.md): configs, exports and checkpoints that hold one switched off still load and resume.
REMOVED_KEYS = {"residual_to_last_past": False}


def drop_removed_keys(values: dict) -> dict:
    """``values`` without the REMOVED_KEYS at their off value; one switched on is refused."""
    on = sorted(k for k, off in REMOVED_KEYS.items() if k in values and values[k] != off)
    if on:
        raise ValueError(f"config keys {on} were removed from mcvd-diffusers (benchmarks/RESULTS.md); this version "
                         "cannot train or resume a run that switches them on")
    return {k: v for k, v in values.items() if k not in REMOVED_KEYS}


def check_resume_compatible(saved: dict, config: TrainConfig, checkpoint: Path, precision: str | None = None,
                            saved_precision: str | None = None) -> None:
    """Refuses to resume ``checkpoint`` (trained with the config ``saved``) with a config that changes the model,
    the data or the optimization. mixed_precision is compared as it runs: ``precision`` is what this config's
    resolves to here (runtime.resolve_precision), ``saved_precision`` what the checkpoint's resolved to where it
    trained (None: its config's value, as recorded before "auto")."""
    current, saved = config.to_dict(), drop_removed_keys(saved)
    unknown = sorted(set(saved) - set(current))
    details = [f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in sorted(current)
               if k not in RESUMABLE_CHANGES and k != "mixed_precision" and k in saved and saved[k] != current[k]]
    if "mixed_precision" in saved:
        details += _precision_change(saved["mixed_precision"], config.mixed_precision, saved_precision, precision,
                                     checkpoint)
    if unknown or details:
        details = "; ".join(details)
        raise ValueError(f"cannot resume {checkpoint} with this config: " + (details or f"unknown keys {unknown}")
                         + ". These keys define the model, the data or the optimization; resume with the "
                         f"checkpoint's values, or start a new run in another output_dir. Keys that may change: "
                         f"{sorted(RESUMABLE_CHANGES)}")


def _precision_change(saved: str, requested: str, saved_run: str | None, run: str | None, checkpoint: Path
                      ) -> list[str]:
    """[] when a run saved with mixed_precision ``saved`` (that ran as ``saved_run``) may resume with ``requested``
    (that runs as ``run`` here), else the reason it may not. "auto" may resume a run saved with what auto resolves
    to here (and the other way round); auto resumes auto, with a warning where it now resolves differently."""
    saved, saved_run, run = ("no" if p == "fp32" else p for p in (saved, saved_run or saved, run or requested))
    if saved == requested == "auto":  # a run that follows the hardware goes on following it
        if saved_run != "auto" and run != "auto" and saved_run != run:
            warnings.warn(f"resuming {checkpoint} (mixed_precision auto), which trained in {saved_run!r}, in {run!r}: "
                          f"auto resolves to {run!r} on this hardware. Pass mixed_precision {saved_run} to keep the "
                          "checkpoint's precision", UserWarning, stacklevel=3)
        return []
    if saved_run == run:
        return []
    was = f"{saved!r}" + (f" (ran as {saved_run!r})" if saved == "auto" and saved_run != "auto" else "")
    now = f"{requested!r}" + (f" (resolves to {run!r} here)" if requested == "auto" else "")
    return [f"mixed_precision: checkpoint {was}, now {now}"]


def build_unet(config: TrainConfig) -> MCVDUNet2DModel:
    overrides = {key: getattr(config, key) for key in ("patch_size", "block_out_channels")
                 if getattr(config, key) is not None}
    layout = {key: getattr(config, key) for key in ("num_past_frames", "num_current_frames", "num_future_frames",
                                                     "prob_mask_past", "prob_mask_future", "partial_past_mask")}
    return MCVDUNet2DModel.from_preset(config.preset, **overrides, sample_size=config.image_size, **layout)


def build_noise_scheduler(config: TrainConfig):
    return make_noise_scheduler(config.beta_schedule, config.prediction_type, config.num_train_timesteps,
                                config.noise_shift)


def training_timesteps(config: TrainConfig) -> torch.Tensor | None:
    """What training draws timesteps from: export_sampler's grid with train_on_sampler_timesteps, else None (all)."""
    if not config.train_on_sampler_timesteps:
        return None
    return config.export_sampler.timesteps(build_noise_scheduler(config).config)


def load_config_file(path: str | os.PathLike) -> dict:
    """Reads a YAML or JSON config file into a dict (validated by TrainConfig.from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    with open(path) as f:
        values = yaml.safe_load(f) if path.suffix in (".yaml", ".yml") else json.load(f)
    if not isinstance(values, (dict, type(None))):
        raise ValueError(f"{path}: a config must be a mapping of keys to values, got {type(values).__name__}")
    return values or {}
