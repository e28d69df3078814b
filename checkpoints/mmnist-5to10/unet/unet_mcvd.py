"""MCVDUNet2DModel: diffusers' UNet2DModel that owns MCVD's frame layout.

MCVD's "concat" network sees the past frames, the noisy current frames and (for
interpolation models) the future frames stacked on the channel axis. This class keeps
that layout in its config, so a saved model is self-describing, and builds the
concatenation itself: callers pass videos shaped (B, frames, C, H, W).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
# model_index.json names this module as the UNet's library; diffusers' loader then looks up
# the base class ModelMixin in it to find the load method, so it must be importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput

# Architectures by name. Every preset takes 5 past frames and predicts 10 at once
# (the reproduction's 5 -> 10 layout); any entry can be overridden in from_preset.
PRESETS: dict[str, dict] = {
    # CPU tests and the quickstart: 0.7M parameters, 0.8 GFLOP per 64x64 sample.
    "tiny": dict(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # Close to the reproduction's DDPM UNet: channels 128/256/256/256, two res blocks
    # per level, attention at 32 px and in the middle, dropout 0.1.
    "paper": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64,
        dropout=0.1,
    ),
    # Made for a 2-core CPU (benchmarks/recipe_search.py): the UNet runs at 16x16 on 4x4
    # pixel-unshuffled frames, so a digit's 36-pixel trip over 10 frames spans 9 cells of a
    # receptive field that covers the whole frame; attention at 4x4.
    "cpu": dict(
        patch_size=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
    ),
    # Short GPU budgets, with the CPU recipe search's lessons: the UNet runs at 32x32 on 2x2
    # pixel-unshuffled frames with twice the width per level (the same FLOPs per level as at
    # 64x64 with half the width, in wider matmuls that suit a GPU); attention at 16x16 and 8x8.
    "fast": dict(
        patch_size=2,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64,
    ),
}


def _check_grid(sample_size, patch_size: int, levels: int) -> None:
    """The UNet halves its (H/patch, W/patch) grid levels-1 times: each side must divide evenly."""
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")
    sizes = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    step = patch_size * 2 ** (levels - 1)
    for size in sizes:
        if size < 1 or size % step:
            raise ValueError(
                f"frames of size {size} do not fit patch_size={patch_size} with {levels} UNet levels: the size must "
                f"be a multiple of patch_size x 2^{levels - 1} = {step} (the grid of {size}/{patch_size} is halved "
                f"{levels - 1} times)"
            )


def _check_layout(num_past_frames, num_current_frames, num_future_frames, frame_channels, prob_mask_past,
                  prob_mask_future, patch_size, partial_past_mask, sample_size,
                  levels) -> tuple[int, int]:
    """Checks the frame layout and masking keys; returns the UNet's in and out channels they imply."""
    if num_past_frames < 0 or num_current_frames < 1 or num_future_frames < 0 or frame_channels < 1:
        raise ValueError(
            "expected num_past_frames >= 0, num_current_frames >= 1, num_future_frames >= 0, frame_channels >= 1; "
            f"got {num_past_frames}, {num_current_frames}, {num_future_frames}, {frame_channels}"
        )
    for name, p in (("prob_mask_past", prob_mask_past), ("prob_mask_future", prob_mask_future)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    _check_grid(sample_size, patch_size, levels)
    if not isinstance(partial_past_mask, bool):
        raise ValueError(f"partial_past_mask must be true or false, got {partial_past_mask!r}")
    if partial_past_mask and prob_mask_past == 0:
        raise ValueError("partial_past_mask needs prob_mask_past > 0 (it says how a masked past is masked)")
    frames = num_past_frames + num_current_frames + num_future_frames
    return frames * frame_channels * patch_size**2, num_current_frames * frame_channels * patch_size**2


class MCVDUNet2DModel(UNet2DModel):
    """A UNet2DModel whose input is [past | noisy current | future] frames on the channel axis.

    Args (beyond UNet2DModel's):
        num_past_frames: conditioning frames before the block to generate.
        num_current_frames: frames generated per denoising block.
        num_future_frames: conditioning frames after the block (interpolation); 0 for none.
        frame_channels: channels per frame (1 for Moving MNIST).
        prob_mask_past / prob_mask_future: the probability with which training replaces
            the past / future block by zeros (MCVD's masking). A model can generate without
            past frames only if it was trained with ``prob_mask_past > 0``, and ignore its
            future slots only if ``prob_mask_future > 0``.
        partial_past_mask: a masked past keeps its last k frames (k = 0, MCVD's full mask, for half the
            masked samples, else uniform in 1..num_past_frames-1), so that unconditional generation can roll
            out block by block when ``num_current_frames < num_past_frames``: each block conditions on the
            frames generated so far, zeros before them. False (configs saved before this key): MCVD's mask.
        patch_size: the UNet runs on frames pixel-unshuffled by this factor (space-to-depth: an
            HxW frame becomes (H/p)x(W/p) with p*p times the channels) and its output is
            pixel-shuffled back; 1 runs it at full resolution.
        in_channels / out_channels: derived from the layout; leave them None.
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
            raise ValueError(
                f"in_channels/out_channels follow from the frame layout and patch size ({expected_in}/{expected_out}); "
                f"got {in_channels}/{out_channels}. Leave them None."
            )
        super().__init__(
            sample_size=sample_size, in_channels=expected_in, out_channels=expected_out,
            center_input_sample=center_input_sample, time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim, freq_shift=freq_shift, flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=tuple(down_block_types), mid_block_type=mid_block_type,
            up_block_types=tuple(up_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding, downsample_type=downsample_type, upsample_type=upsample_type,
            dropout=dropout, act_fn=act_fn, attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups, norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift, add_attention=add_attention,
            class_embed_type=class_embed_type, num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )

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
        """Copies a trained model's weights into this one (fine-tuning it into a model with more
        conditioning slots, e.g. a predictor into an interpolating, generating model). Everything but
        the future slots and the masking must match; the first convolution keeps the source's
        channels for the past, current and its future frames, and new future slots start at zero, so
        the warm-started model computes exactly what the source did until it learns to use them."""
        mine, theirs = dict(self.config), dict(source.config)
        differ = sorted(k for k in set(mine) | set(theirs)
                        if k not in self.WARM_START_FREE and mine.get(k) != theirs.get(k))
        if differ or theirs["num_future_frames"] > mine["num_future_frames"]:
            details = [f"{k}: source {theirs.get(k)!r}, this model {mine.get(k)!r}" for k in differ]
            if theirs["num_future_frames"] > mine["num_future_frames"]:
                details.append(f"num_future_frames: source {theirs['num_future_frames']} > this model's "
                               f"{mine['num_future_frames']}")
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
            raise ValueError(
                f"expected clips of shape (B, {self.clip_length}, {', '.join(map(str, self.frame_shape))}), "
                f"got {tuple(clip.shape)}"
            )
        past, current, future = clip.split(
            [cfg.num_past_frames, cfg.num_current_frames, cfg.num_future_frames], dim=1
        )
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
        """Predicts the noise (or v, or x0) of the current frames.

        Args:
            sample: noisy current frames (B, num_current_frames, C, H, W), data in [-1, 1].
            timestep: diffusion step(s), a number or a (B,) tensor.
            past_frames / future_frames: (B, num_past_frames / num_future_frames, C, H, W) in
                [-1, 1]; None means the block is masked (zeros), as in MCVD.
            keep_past / keep_future: optional (B,) bool tensors, False masks that sample's block; or
                (B, frames), False masks that frame (a partial mask).

        Returns:
            ``UNet2DOutput`` whose ``sample`` has the shape of ``sample``.
        """
        cfg = self.config
        expected = (cfg.num_current_frames, *self.frame_shape)
        if sample.ndim != 5 or tuple(sample.shape[1:]) != expected:
            raise ValueError(f"sample must have shape (B, {', '.join(map(str, expected))}), got {tuple(sample.shape)}")
        if future_frames is not None and cfg.num_future_frames == 0:
            raise ValueError("future_frames given, but this model has no future-frame slots (num_future_frames=0)")
        current = sample.flatten(1, 2)
        blocks = [
            self._condition(past_frames, cfg.num_past_frames, "past_frames", current, keep_past),
            current,
            self._condition(future_frames, cfg.num_future_frames, "future_frames", current, keep_future),
        ]
        patch = cfg.patch_size
        net_input = torch.cat(blocks, dim=1)
        if patch > 1:
            net_input = F.pixel_unshuffle(net_input, patch)
        out = super().forward(net_input, timestep, class_labels=class_labels, return_dict=False)[0]
        if patch > 1:
            out = F.pixel_shuffle(out, patch)
        out = out.reshape(sample.shape)
        return UNet2DOutput(sample=out) if return_dict else (out,)


# diffusers runs this file twice when it loads an export as remote code (trust_remote_code=True): for the
# pipeline's import and for the unet component, under two module names. Both bind MCVDUNet2DModel to the
# first class made from this file's bytes, so that the unet is an instance of the class the pipeline
# expects (one class; otherwise diffusers warns "Expected types for unet"). In the package it runs once.
def _first_made(cls):
    import hashlib
    import sys
    import types

    registry = sys.modules.setdefault("_mcvd_diffusers_remote_code", types.ModuleType("_mcvd_diffusers_remote_code"))
    with open(__file__, "rb") as f:
        key = f"unet_mcvd:{hashlib.sha256(f.read()).hexdigest()[:16]}:{cls.__name__}"
    return registry.__dict__.setdefault(key, cls)


MCVDUNet2DModel = _first_made(MCVDUNet2DModel)
