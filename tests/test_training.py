import json

import pytest
import torch

from mcvd_diffusers import MCVDPipeline
from mcvd_diffusers.masking import draw_keep_mask
from mcvd_diffusers.training import TrainConfig, parse_overrides, train


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown config keys \['lr'\]; valid keys: .*learning_rate"):
        TrainConfig.from_dict({"lr": 1e-4})
    for bad, message in [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"preset": "huge"}, "preset must be one of"),
        ({"max_steps": "many"}, "'max_steps' expects"),
        ({"batch_size": 1.5}, "'batch_size' expects"),
        ({"prediction_type": "eps"}, "prediction_type must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(bad)


def test_command_line_overrides_are_typed():
    config = TrainConfig.from_dict(parse_overrides(
        ["--max_steps", "7", "--learning_rate=1e-3", "--mnist_root", "none", "--overwrite", "true"]))
    assert (config.max_steps, config.learning_rate, config.mnist_root, config.overwrite) == (7, 1e-3, None, True)
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--max_steps"])


def test_mask_probability_is_respected():
    keep = draw_keep_mask(20000, 0.3, torch.Generator().manual_seed(0))
    assert abs((~keep).float().mean().item() - 0.3) < 0.015
    assert draw_keep_mask(8, 0.0) is None


def test_short_run_exports_a_loadable_pipeline(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig.from_dict(dict(preset="tiny", mnist_root="bundled", image_size=32, num_past_frames=2,
                                        num_current_frames=3, prob_mask_past=0.5, batch_size=2, max_steps=3,
                                        warmup_steps=1, output_dir=str(out), log_every=1))
    pipeline_dir = train(config)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and "bundled" in summary["data_source"]
    assert summary["config"]["prob_mask_past"] == 0.5
    pipe = MCVDPipeline.from_pretrained(pipeline_dir)
    assert pipe.unet.config.prob_mask_past == 0.5 and pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=2).frames.shape == (1, 3, 1, 32, 32)  # unconditional works
    with pytest.raises(ValueError, match="already holds files"):
        train(config)  # never overwrites a run unless asked


def test_training_with_the_cpu_fast_paths_on(tmp_path):
    config = TrainConfig.from_dict(dict(preset="tiny", mnist_root="bundled", image_size=32, num_past_frames=2,
                                        num_current_frames=3, batch_size=2, max_steps=2, warmup_steps=1,
                                        mixed_precision="bf16", channels_last=True, fused_adamw=True,
                                        output_dir=str(tmp_path / "run")))
    pipe = MCVDPipeline.from_pretrained(train(config))
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["config"]["mixed_precision"] == "bf16"
