"""The README's main job at toy size: train_mcvd.py then eval_mcvd.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_train_then_evaluate_writes_a_gif_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    trained = run("train_mcvd.py", "--config", "configs/tiny.yaml", "--max_steps", "2", "--batch_size", "2",
                  "--output_dir", str(run_dir))
    assert trained.returncode == 0, trained.stderr
    assert "data: bundled MNIST sample" in trained.stdout
    evaluated = run("eval_mcvd.py", "--model", str(run_dir / "pipeline"), "--samplers", "ddpm:3", "ddim:2",
                    "--num-clips", "2", "--mnist-root", "bundled", "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"copy last frame", "ddpm:3", "ddim:2"}
    assert all(r["mse"] > 0 for r in metrics["results"].values())
    assert "bundled" in metrics["test_set"]["data_source"]
    gif = tmp_path / "eval" / "predictions.gif"
    from PIL import Image

    with Image.open(gif) as image:
        assert image.n_frames == 15  # 5 past + 10 predicted


@pytest.mark.parametrize(
    "args, message",
    [
        (["train_mcvd.py", "--config", "configs/tiny.yaml", "--learning_rat", "1e-3"], "unknown config keys"),
        (["train_mcvd.py", "--config", "configs/missing.yaml"], "not found"),
        (["eval_mcvd.py", "--model", "nowhere/at/all", "--out", "x"], "not a folder holding a saved MCVDPipeline"),
    ],
)
def test_bad_arguments_fail_before_any_work(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr


def test_unknown_sampler_is_rejected_before_loading(tmp_path):
    from mcvd_diffusers.evaluation import evaluate_samplers, parse_sampler

    assert parse_sampler("dpm++:20") == ("dpm++", 20)
    for spec, message in [("euler:20", "unknown sampler 'euler'"), ("ddim", "needs a step count"),
                          ("ddim:0", "needs a step count")]:
        with pytest.raises(ValueError, match=message):
            evaluate_samplers("nowhere", [spec], 1, tmp_path)
