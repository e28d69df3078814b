"""Noise schedules for training, and named diffusers samplers (stock schedulers built ``from_config`` from the
pipeline's scheduler config, so sharing its noise schedule) for inference. They use ``"trailing"`` timesteps, which
start at the last training step (t=999, pure noise): diffusers' DDIM default (``"leading"``) starts 50-step sampling
at t=980, far from pure noise under a cosine schedule, the cause of the reproduction's DDIM collapse."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# The multistep solvers clip their x0 estimate to [-1, 1] like DDPM and DDIM (clip_sample): their
# "thresholding" with sample_max_value=1 is exactly that clip. Without it, the quickstart model's
# DPM-Solver++-20 samples were speckled (binarized SSIM 0.22, with it 0.45; 8 clips x 2 samples).
_CLIP_X0 = {"thresholding": True, "sample_max_value": 1.0}

# name -> (scheduler class, config overrides). Documented in docs/usage.md.
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {"timestep_spacing": "trailing"}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
    "dpm++": (DPMSolverMultistepScheduler, {"timestep_spacing": "trailing", "algorithm_type": "dpmsolver++",
                                            "solver_order": 2, "final_sigmas_type": "zero", **_CLIP_X0}),
    "unipc": (UniPCMultistepScheduler, {"timestep_spacing": "trailing", "final_sigmas_type": "zero", **_CLIP_X0}),
}


def make_noise_scheduler(beta_schedule: str = "cosine", prediction_type: str = "v_prediction",
                         num_train_timesteps: int = 1000, noise_shift: float = 1.0) -> DDPMScheduler:
    """The training scheduler, which is also the scheduler a new pipeline ships with (DDPM, x0 clipped to [-1, 1]).

    ``noise_shift`` s > 1 divides the signal-to-noise ratio of every step by s^2 (the shifted schedules
    of "simple diffusion", Hoogeboom et al. 2023): more of training and sampling at high noise. The
    shifted schedule is stored as ``trained_betas``, so every sampler built with ``from_config`` shares it."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {sorted(BETA_SCHEDULES)}, got {beta_schedule!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not (isinstance(noise_shift, (int, float)) and math.isfinite(noise_shift) and noise_shift > 0):
        raise ValueError(f"noise_shift must be a finite number > 0, got {noise_shift!r}")
    trained_betas = None
    if noise_shift != 1:  # betas whose cumulative alphas have the schedule's SNR divided by shift^2
        alphas_cumprod = DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                       beta_schedule=BETA_SCHEDULES[beta_schedule]).alphas_cumprod.double()
        snr = alphas_cumprod / (1 - alphas_cumprod) / noise_shift**2
        shifted = snr / (1 + snr)
        trained_betas = (1 - shifted / torch.cat([shifted.new_ones(1), shifted[:-1]])).clamp(max=0.999).tolist()
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=BETA_SCHEDULES[beta_schedule],
                         prediction_type=prediction_type, clip_sample=True, clip_sample_range=1.0,
                         timestep_spacing="trailing", trained_betas=trained_betas)


def make_sampler(name: str, config) -> SchedulerMixin:
    """A named sampler (``SAMPLERS``) built from a pipeline's scheduler config."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    return cls.from_config(config, **overrides)


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler and its step count, written NAME:STEPS ("ddim:20") where a user writes it."""

    name: str
    steps: int
    FORMAT: typing.ClassVar[str] = f"NAME:STEPS with NAME one of {sorted(SAMPLERS)} and STEPS >= 1"

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r} in {str(self)!r}; choose one of {sorted(SAMPLERS)} as "
                             "NAME:STEPS")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"sampler {str(self)!r} needs a step count >= 1, as {self.name}:50")

    @classmethod
    def parse(cls, spec: "str | SamplerSpec") -> "SamplerSpec":
        """ "ddim:50" -> SamplerSpec("ddim", 50); a SamplerSpec is returned as it is."""
        if isinstance(spec, SamplerSpec):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"a sampler is written NAME:STEPS (e.g. ddim:50), got {spec!r}")
        name, sep, steps = spec.partition(":")
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r} in {spec!r}; choose one of {sorted(SAMPLERS)} as NAME:STEPS")
        if not sep or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"sampler {spec!r} needs a step count >= 1, as {name}:50")
        return cls(name, int(steps))

    def __str__(self) -> str:
        return f"{self.name}:{self.steps}"

    def build(self, trained_config) -> SchedulerMixin:
        """The scheduler, from the trained (pipeline's own) scheduler config: never another sampler's."""
        return make_sampler(self.name, trained_config)

    def timesteps(self, trained_config) -> torch.Tensor:
        """The training timesteps this sampler visits, in its order (ddim:5 -> 999, 799, 599, 399, 199)."""
        sampler = self.build(trained_config)
        sampler.set_timesteps(self.steps)
        return sampler.timesteps.long()
