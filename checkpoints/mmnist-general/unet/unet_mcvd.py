"""MCVDUNet2DModel: diffusers' UNet2DModel that owns MCVD's frame layout: it stacks the past, the noisy current
and (interpolation) the future frames on the channel axis itself, from videos shaped (B, frames, C, H, W)."""

from __future__ import annotations

import hashlib
import inspect
import sys
import types

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
# model_index.json names this module as the UNet's library; diffusers' loader then looks up
# the base class ModelMixin in it to find the load method, so it must be importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput

# Architectures by name, each at the 5 past -> 10 frames layout; from_preset overrides any entry.
PRESETS: dict[str, dict] = {
    # CPU tests and the quickstart: 0.7M parameters, 0.8 GFLOP per 64x64 sample.
    "tiny": dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    # Close to the reproduction's DDPM UNet: attention at 32 px and in the middle, dropout 0.1.
    "paper": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention_head_dim=64, dropout=0.1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # A 2-core CPU's (benchmarks/recipe_search.py): a 16x16 grid of 4x4 pixel-unshuffled frames, so a digit's
    # 36-pixel trip over 10 frames spans 9 cells of a receptive field that covers the whole frame.
    "cpu": dict(patch_size=4, block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=32,
                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    # Short GPU budgets: a 32x32 grid of 2x2 pixel-unshuffled frames at twice the width per level (the FLOPs of
    # 64x64 at half the width, in wider matmuls that suit a GPU); attention at 16x16 and 8x8.
    "fast": dict(patch_size=2, block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention_head_dim=64,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def _check_layout(num_past_frames, num_current_frames, num_future_frames, frame_channels, prob_mask_past,
                  prob_mask_future, patch_size, partial_past_mask, sample_size, levels) -> tuple[int, int]:
    """Checks the frame layout, masking keys and grid; returns the UNet's in and out channels they imply."""
    if num_past_frames < 0 or num_current_frames < 1 or num_future_frames < 0 or frame_channels < 1:
        raise ValueError("expected num_past_frames >= 0, num_current_frames >= 1, num_future_frames >= 0, "
                         f"frame_channels >= 1; got {num_past_frames}, {num_current_frames}, {num_future_frames}, "
                         f"{frame_channels}")
    for name, p in (("prob_mask_past", prob_mask_past), ("prob_mask_future", prob_mask_future)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")
    step = patch_size * 2 ** (levels - 1)  # the UNet halves its (H/patch, W/patch) grid levels-1 times
    for size in (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size):
        if size < 1 or size % step:
            raise ValueError(f"frames of size {size} do not fit patch_size={patch_size} with {levels} UNet levels: the "
                             f"size must be a multiple of patch_size x 2^{levels - 1} = {step} (the grid of "
                             f"{size}/{patch_size} is halved {levels - 1} times)")
    if not isinstance(partial_past_mask, bool):
        raise ValueError(f"partial_past_mask must be true or false, got {partial_past_mask!r}")
    if partial_past_mask and prob_mask_past == 0:
        raise ValueError("partial_past_mask needs prob_mask_past > 0 (it says how a masked past is masked)")
    frames = num_past_frames + num_current_frames + num_future_frames
    return frames * frame_channels * patch_size**2, num_current_frames * frame_channels * patch_size**2


class MCVDUNet2DModel(UNet2DModel):
    """A UNet2DModel whose input is [past | noisy current | future] frames on the channel axis.

    Args (beyond UNet2DModel's; in_channels / out_channels follow from them: leave them None):
        num_past_frames / num_current_frames / num_future_frames: conditioning frames before the block, frames
            generated per denoising block, conditioning frames after it (interpolation; 0 for none).
        frame_channels: channels per frame (1 for Moving MNIST).
        prob_mask_past / prob_mask_future: how often training replaces the past / future block by zeros (MCVD's
            masking); a model generates without past frames, or ignores its future slots, only if it is > 0.
        partial_past_mask: a masked past keeps its last k frames (k = 0, MCVD's full mask, for half the masked
            samples, else uniform in 1..num_past_frames-1), so that generation rolls out block by block when
            ``num_current_frames < num_past_frames``. False (configs saved before this key): MCVD's mask.
        patch_size: the UNet runs on (H/p)x(W/p) frames pixel-unshuffled by this factor (1: full resolution).
    """

    @register_to_config
    def __init__(
        self,
        num_past_frames: int = 5,
        num_current_frames: int = 10,
        num_future_frames: int = 0,
        frame_channels: int = 1,
        prob_mask_past: float = 0.0,
        prob_mask_future: float = 0.0,
        patch_size: int = 1,
        partial_past_mask: bool = False,
        sample_size: int = 64,
        in_channels: int | None = None,
        out_channels: int | None = None,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = PRESETS["paper"]["down_block_types"],
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = PRESETS["paper"]["up_block_types"],
        block_out_channels: tuple[int, ...] = PRESETS["paper"]["block_out_channels"],
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        expected_in, expected_out = _check_layout(
            num_past_frames, num_current_frames, num_future_frames, frame_channels, prob_mask_past, prob_mask_future,
            patch_size, partial_past_mask, sample_size, len(block_out_channels))
        if in_channels not in (None, expected_in) or out_channels not in (None, expected_out):
            raise ValueError(f"in_channels/out_channels follow from the frame layout and patch size ({expected_in}/"
                             f"{expected_out}); got {in_channels}/{out_channels}. Leave them None.")
        # UNet2DModel gets its own arguments as given (register_to_config has recorded them all in self.config by
        # now), the block lists as tuples, and the channels the layout implies
        unet_args = {k: v for k, v in self.config.items() if k in inspect.signature(UNet2DModel.__init__).parameters}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            unet_args[key] = tuple(unet_args[key])
        super().__init__(**{**unet_args, "in_channels": expected_in, "out_channels": expected_out})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MCVDUNet2DModel":
        """A freshly initialized model of a named architecture (``PRESETS``), with config overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(overrides) - valid
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(valid)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        size = self.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return self.config.frame_channels, height, width

    @property
    def clip_length(self) -> int:
        """Frames in one training clip: past + current + future."""
        cfg = self.config
        return cfg.num_past_frames + cfg.num_current_frames + cfg.num_future_frames

    # Config keys a warm start may change: the conditioning slots and how training masks them.
    WARM_START_FREE = {"num_future_frames", "prob_mask_past", "prob_mask_future", "partial_past_mask", "in_channels",
                       "_name_or_path", "_use_default_values", "_diffusers_version", "_class_name"}

    @torch.no_grad()
    def warm_start_from(self, source: "MCVDUNet2DModel") -> None:
        """Copies a trained model's weights into this one, which may have more future slots (e.g. a predictor
        into an interpolating, generating model) and other masking. The new future slots' input channels start
        at zero: the warm-started model computes exactly what the source did until it learns to use them."""
        mine, theirs = dict(self.config), dict(source.config)
        details = [f"{k}: source {theirs.get(k)!r}, this model {mine.get(k)!r}" for k in sorted(set(mine) | set(theirs))
                   if k not in self.WARM_START_FREE and mine.get(k) != theirs.get(k)]
        if theirs["num_future_frames"] > mine["num_future_frames"]:
            details.append(f"num_future_frames: source {theirs['num_future_frames']} > this model's "
                           f"{mine['num_future_frames']}")
        if details:
            raise ValueError("cannot warm-start from a model of another architecture: " + "; ".join(details)
                             + ". Only num_future_frames may grow, and the masking may change")
        state = source.state_dict()
        theirs_in = state.pop("conv_in.weight")  # (out, in, k, k), in: [past | current | future] frames
        self.conv_in.weight.zero_()[:, :theirs_in.shape[1]] = theirs_in  # new future channels stay zero
        missing, unexpected = self.load_state_dict(state, strict=False)
        assert missing == ["conv_in.weight"] and not unexpected, (missing, unexpected)  # same config, same tensors

    def split_clip(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, clip_length, C, H, W) -> past, current, future (None when the model has no future slots)."""
        cfg = self.config
        if clip.ndim != 5 or tuple(clip.shape[1:]) != (self.clip_length, *self.frame_shape):
            raise ValueError(f"expected clips of shape (B, {self.clip_length}, {', '.join(map(str, self.frame_shape))}"
                             f"), got {tuple(clip.shape)}")
        past, current, future = clip.split([cfg.num_past_frames, cfg.num_current_frames, cfg.num_future_frames], dim=1)
        return past, current, (future if cfg.num_future_frames else None)

    @property
    def can_generate_without_past(self) -> bool:
        return self.config.num_past_frames == 0 or self.config.prob_mask_past > 0

    @property
    def can_roll_out_without_past(self) -> bool:
        """Unconditional generation beyond one block: each block conditions on the frames generated before it."""
        cfg = self.config
        return self.can_generate_without_past and (
            cfg.num_current_frames >= cfg.num_past_frames or getattr(cfg, "partial_past_mask", False))

    @property
    def can_generate_without_future(self) -> bool:
        return self.config.num_future_frames == 0 or self.config.prob_mask_future > 0

    def _condition(self, frames, count, name, like, keep):
        """A conditioning block as channels (B, count*C, H, W): zeros where absent or masked."""
        batch = like.shape[0]
        if frames is None:
            return like.new_zeros(batch, count * self.config.frame_channels, *like.shape[-2:])
        expected = (batch, count, *self.frame_shape)
        if tuple(frames.shape) != expected:
            raise ValueError(f"{name} must have shape (B, frames, C, H, W) = {expected}, got {tuple(frames.shape)}")
        frames = frames.to(like.dtype).flatten(1, 2)
        if keep is not None:  # per sample (B,), or per frame (B, count) for a partial mask
            if keep.shape not in ((batch,), (batch, count)):
                raise ValueError(f"the keep mask for {name} must have shape ({batch},) or ({batch}, {count}), "
                                 f"got {tuple(keep.shape)}")
            per_frame = keep.to(frames.dtype).reshape(batch, -1, 1, 1, 1).expand(batch, count, *self.frame_shape)
            frames = frames * per_frame.flatten(1, 2)
        return frames

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        past_frames: torch.Tensor | None = None,
        future_frames: torch.Tensor | None = None,
        keep_past: torch.Tensor | None = None,
        keep_future: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """Predicts the noise (or v, or x0) of the current frames: a ``UNet2DOutput`` shaped like ``sample``.

        Args:
            sample: noisy current frames (B, num_current_frames, C, H, W), data in [-1, 1].
            timestep: diffusion step(s), a number or a (B,) tensor.
            past_frames / future_frames: (B, num_past_frames / num_future_frames, C, H, W) in [-1, 1]; None
                means the block is masked (zeros), as in MCVD.
            keep_past / keep_future: optional (B,) bool tensors, False masks that sample's block; or (B, frames),
                False masks that frame (a partial mask).
        """
        cfg = self.config
        expected = (cfg.num_current_frames, *self.frame_shape)
        if sample.ndim != 5 or tuple(sample.shape[1:]) != expected:
            raise ValueError(f"sample must have shape (B, {', '.join(map(str, expected))}), got {tuple(sample.shape)}")
        if future_frames is not None and cfg.num_future_frames == 0:
            raise ValueError("future_frames given, but this model has no future-frame slots (num_future_frames=0)")
        current = sample.flatten(1, 2)
        past = self._condition(past_frames, cfg.num_past_frames, "past_frames", current, keep_past)
        future = self._condition(future_frames, cfg.num_future_frames, "future_frames", current, keep_future)
        net_input = torch.cat([past, current, future], dim=1)
        if cfg.patch_size > 1:
            net_input = F.pixel_unshuffle(net_input, cfg.patch_size)
        out = super().forward(net_input, timestep, class_labels=class_labels, return_dict=False)[0]
        if cfg.patch_size > 1:
            out = F.pixel_shuffle(out, cfg.patch_size)
        out = out.reshape(sample.shape)
        return UNet2DOutput(sample=out) if return_dict else (out,)


# diffusers runs this file twice when it loads an export as remote code (trust_remote_code=True), for the pipeline's
# import and for the unet component: both runs bind MCVDUNet2DModel to the first class made from this file's bytes,
# so that the unet is an instance of the class the pipeline expects (else diffusers warns "Expected types for unet").
def _first_made(cls):
    registry = sys.modules.setdefault("_mcvd_diffusers_remote_code", types.ModuleType("_mcvd_diffusers_remote_code"))
    with open(__file__, "rb") as f:
        key = f"unet_mcvd:{hashlib.sha256(f.read()).hexdigest()[:16]}:{cls.__name__}"
    return registry.__dict__.setdefault(key, cls)


MCVDUNet2DModel = _first_made(MCVDUNet2DModel)
