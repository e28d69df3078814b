"""mcvd-diffusers: Masked Conditional Video Diffusion (Voleti et al., 2022) as diffusers components."""

from .unet.unet_mcvd import PRESETS, MCVDUNet2DModel
from .pipeline_mcvd import MCVDPipeline, MCVDPipelineOutput
from .schedulers import SAMPLERS, make_noise_scheduler, make_sampler

__version__ = "0.1.0"
__all__ = ["MCVDUNet2DModel", "MCVDPipeline", "MCVDPipelineOutput", "PRESETS", "SAMPLERS", "make_noise_scheduler",
           "make_sampler"]
