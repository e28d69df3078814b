"""The UNet's former place, for folders saved before it moved (model_index.json names this module) and imports."""

from ..unet.unet_mcvd import PRESETS, MCVDUNet2DModel

__all__ = ["MCVDUNet2DModel", "PRESETS"]
