from ..unet.unet_mcvd import PRESETS, MCVDUNet2DModel

__all__ = ["MCVDUNet2DModel", "PRESETS"]
