"""The UNet's former place, kept so that pipeline folders saved before it moved to ``mcvd_diffusers/unet/``
(their model_index.json names ``mcvd_diffusers.models.unet_mcvd``) and imports from here keep working."""

from ..unet.unet_mcvd import PRESETS, MCVDUNet2DModel, _check_grid  # noqa: F401

__all__ = ["MCVDUNet2DModel", "PRESETS"]
