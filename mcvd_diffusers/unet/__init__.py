"""The UNet component, laid out as an exported pipeline folder holds it (``unet/unet_mcvd.py``), so that
exports copy the file unchanged (remote_code.py)."""

from .unet_mcvd import PRESETS, MCVDUNet2DModel

__all__ = ["MCVDUNet2DModel", "PRESETS"]
