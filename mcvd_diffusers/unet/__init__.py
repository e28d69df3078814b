"""The UNet component, where an export holds it (``unet/unet_mcvd.py``, copied unchanged by remote_code.py)."""

from .unet_mcvd import PRESETS, MCVDUNet2DModel

__all__ = ["MCVDUNet2DModel", "PRESETS"]
