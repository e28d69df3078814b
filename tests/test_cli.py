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
    assert "precision: fp32 (as configured; this CPU has" in trained.stdout  # tiny.yaml says "no"
    evaluated = run("eval_mcvd.py", "--model", str(run_dir / "pipeline"), "--samplers", "ddpm:3", "ddim:2",
                    "--num_clips", "2", "--samples_per_clip", "2", "--mnist_root", "bundled",
                    "--out", str(tmp_path / "eval"), "--update_model_card", "--precision", "auto")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"report: {tmp_path / 'eval'}/report.html" in evaluated.stdout
    assert "| ddim:2 | 2 |" in evaluated.stdout  # the summary table is printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["rows"]) == {"ground truth", "copy last frame", "ddpm:3", "ddim:2"}
    assert "bundled" in metrics["data_source"]
    precision = metrics["precision"]  # auto, as it resolved on this machine's CPU
    assert precision["requested"] == metrics["eval_config"]["precision"] == "auto"
    assert precision["resolved"] == ("bf16" if precision["cpu_native_bf16"] else "fp32") and precision["cpu_model"]
    card = (run_dir / "pipeline" / "README.md").read_text()
    assert "| ddim:2 | 2 |" in card and "Not evaluated yet" not in card  # the card now shows the table
    exported = run("train_mcvd.py", "--export", str(run_dir / "checkpoints" / "checkpoint-2"), "--to",
                   str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train_mcvd.py", "--config", "configs/tiny.yaml", "--learning_rat", "1e-3"], "unknown config keys"),
        (["train_mcvd.py", "--config", "configs/missing.yaml"], "not found"),
        (["eval_mcvd.py", "--model", "nowhere/at/all", "--out", "x"], "not a folder holding a saved MCVDPipeline"),
        (["train_mcvd.py", "--export", "runs/none/checkpoint-1", "--to", "x"], "not a training checkpoint"),
        (["train_mcvd.py", "--push", "runs/none/pipeline"], "push_to_hub needs hub_model_id"),
        (["train_mcvd.py", "--push", "runs/none/pipeline", "--hub_model_id", "u/m", "--max_steps", "3"],
         "take only --hub_model_id and --hub_private"),
        (["train_mcvd.py", "--config", "configs/tiny.yaml", "--max-steps", "0"], "max_steps must be >= 1"),
        (["eval_mcvd.py", "--model", "m", "--out", "x", "--num-clips", "0"], "num_clips must be"),
        (["eval_mcvd.py", "--model", "m", "--out", "x", "--num-clip", "3"], "unknown config keys ['num-clip']"),
        (["benchmarks/bench_data.py", "--preset", "tiny", "--num_frames", "x"], "--num-frames: invalid int value"),
        (["eval_mcvd.py", "--model", "m", "--out", "x", "--no-timing"], "--no-timing is not a flag any more: use "
                                                                         "--timing false"),
        (["eval_mcvd.py", "--model", "m", "--out", "x", "--threads", "0"], "threads must be >= 1, got 0"),
        (["benchmarks/bench_data.py", "--preset", "tiny", "--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bad_arguments_fail_before_any_work(args, message, run_script):
    code, stderr = run_script(*args)
    assert code == 2 and message in stderr


def test_both_commands_document_every_key_with_its_help_and_default():
    import dataclasses

    import eval_mcvd
    import train_mcvd

    from mcvd_diffusers.config import TrainConfig
    from mcvd_diffusers.evaluation import EvalConfig

    for module, cls in ((train_mcvd, TrainConfig), (eval_mcvd, EvalConfig)):
        text = " ".join(module.build_parser().format_help().split())  # argparse wraps lines
        for field in dataclasses.fields(cls):
            assert len(field.metadata["help"].split()) >= 2, (cls.__name__, field.name)  # a sentence, not a stub
            assert f"--{field.name}" in text, (cls.__name__, field.name)
    # what a user reads (argparse may wrap it anywhere, so compared without whitespace)
    train_help = "".join(train_mcvd.build_parser().format_help().split())
    assert "--learning_rateLEARNING_RATEAdamW'speaklearningrate(default:0.0002)" in train_help
    eval_help = "".join(eval_mcvd.build_parser().format_help().split())
    assert "--num_clipsNUM_CLIPSthefirstNclipsofthetestset(default:256)" in eval_help
    assert "--modelMODELasavedMCVDPipelinefolderoraHubrepoid(required)" in eval_help
