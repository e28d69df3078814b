import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from mcvd_diffusers import MCVDPipeline, make_noise_scheduler
from mcvd_diffusers.checkpointing import list_checkpoints
from mcvd_diffusers.data.moving_mnist import MovingMNIST
from mcvd_diffusers.hub import push_to_hub
from mcvd_diffusers.lr_schedules import make_lr_schedule
from mcvd_diffusers.config import TrainConfig, build_unet, check_resume_compatible, load_config_file
from mcvd_diffusers.export import export_checkpoint
from mcvd_diffusers.losses import draw_keep_mask, min_snr_weights
from mcvd_diffusers.schedulers import SamplerSpec
from mcvd_diffusers.trainer import train
from mcvd_diffusers.validation import ValidationSet

REPO = Path(__file__).resolve().parents[1]


def small_config(out, **overrides) -> TrainConfig:
    """A 32-px tiny run of a few steps that validates and checkpoints every 2 steps."""
    values = dict(preset="tiny", mnist_root="bundled", image_size=32, num_past_frames=2, num_current_frames=3,
                  batch_size=2, max_steps=6, learning_rate=1e-3, warmup_steps=1, validate_every=2, val_clips=8,
                  val_batch_size=4, sample_every=0, sample_sampler="ddim:2", checkpoint_every=2, checkpoints_total_limit=None, log_every=1,
                  report_to="none", output_dir=str(out))
    # a plateau rule that cuts the LR at most validations, so that its state matters on resume
    values.update(plateau_patience=0, plateau_threshold=0.5, plateau_factor=0.5)
    # fp32 on every machine: the default, auto, runs bf16 on a CPU with native bf16, and these tests compare numbers
    values.update(mixed_precision="no")
    values.update(overrides)
    return TrainConfig.from_dict(values)


def run_weights(out: Path) -> dict[str, torch.Tensor]:
    final = list_checkpoints(out / "checkpoints")[-1]
    weights = {f"model.{k}": v for k, v in load_file(final / "model.safetensors").items()}
    weights.update({f"ema.{k}": v for k, v in load_file(final / "ema.safetensors").items()})
    weights.update({f"export.{k}": v for k, v in
                    load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").items()})
    return weights


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = run_weights(a), run_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed run ended with different weights"
    sa, sb = (json.loads((p / "train_summary.json").read_text()) for p in (a, b))
    assert sa["validations"] == sb["validations"] and sa["weights_step"] == sb["weights_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    # GIFs and TensorBoard on: neither may change the weights (the other runs of these tests have them off)
    train(small_config(out, sample_every=2, sample_clips=2, sample_sampler="ddim:2", report_to="tensorboard"))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return out


# ------------------------------------------------------------------------------------- config
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
        ({"preset": "paper", "image_size": 36}, "image_size must be >= 28 and a multiple of 8"),
        ({"num_past_frames": 0, "prob_mask_past": 0.5}, "prob_mask_past > 0 needs num_past_frames > 0"),
        ({"prob_mask_future": 0.5}, "prob_mask_future > 0 needs num_future_frames > 0"),
        ({"lr_scheduler": "plateau"}, "lr_scheduler must be one of"),
        ({"validate_every": 0}, "warmup_plateau needs validate_every > 0"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
        ({"sample_sampler": "ddim"}, "sample_sampler must be NAME:STEPS"),
        ({"push_to_hub": True}, "push_to_hub needs hub_model_id"),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma must be > 0"),
        ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be >= 1"),
        ({"export_sampler": "ddim:0"}, "export_sampler must be NAME:STEPS"),
        ({"patch_size": 0}, "patch_size must be >= 1"),
        ({"preset": "cpu", "image_size": 40}, r"image_size must be >= 28 and a multiple of 16 \(patch_size 4 x 2\^2"),
        ({"patch_size": 8, "image_size": 48}, r"a multiple of 32 \(patch_size 8 x 2\^2: the tiny preset runs on a grid "
                                               r"of image_size/8"),
        ({"block_out_channels": [16, 32]}, "block_out_channels must list 3 positive widths"),
        ({"block_out_channels": [16, 0, 32]}, "block_out_channels must list 3 positive widths"),
        ({"block_out_channels": [16, 32, 6.5]}, "'block_out_channels' expects"),
        ({"preset": "cpu", "block_out_channels": [48, 96, 96]},
         "block_out_channels must be multiples of 32, the cpu preset's norm_num_groups"),
        ({"block_out_channels": [16, 20, 32]}, "block_out_channels must be multiples of 8, the tiny preset's"),
        ({"adam_beta2": 1.0}, r"adam_beta1 and adam_beta2 must be in \[0, 1\)"),
        ({"adam_beta1": -0.1}, r"adam_beta1 and adam_beta2 must be in \[0, 1\)"),
        ({"noise_shift": 0.0}, "noise_shift must be a finite number > 0"),
        ({"noise_shift": float("inf")}, "noise_shift must be a finite number > 0"),
        ({"mixed_precision": "fp64"}, r"mixed_precision must be one of auto, no \(or fp32\), bf16, fp16, got 'fp64'"),
        ({"mixed_precision": True}, r"mixed_precision must be one of auto, no \(or fp32\), bf16, fp16, got true"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(bad)


def command_line(*argv: str) -> TrainConfig:
    """The config train_mcvd.py builds from a command line (no config file)."""
    import train_mcvd
    from mcvd_diffusers.cli import given_values

    parser = train_mcvd.build_parser()
    train_mcvd.refuse_unknown_flags(parser, list(argv), TrainConfig)
    return TrainConfig.from_dict(given_values(parser.parse_args(list(argv)), TrainConfig))


def test_command_line_overrides_are_typed(capsys):
    config = command_line("--max_steps", "7", "--learning_rate=1e-3", "--mnist_root", "none", "--push_to_hub",
                          "--hub_model_id", "u/m", "--min_snr_gamma", "5")
    assert (config.max_steps, config.learning_rate, config.mnist_root) == (7, 1e-3, None)
    assert (config.push_to_hub, config.hub_model_id, config.min_snr_gamma) == (True, "u/m", 5.0)
    config = command_line("--block_out_channels", "[8, 16, 32]", "--patch_size", "2", "--noise_shift", "2",
                          "--export_sampler", "dpm++:12", "--overwrite", "false")
    assert (config.block_out_channels, config.patch_size, config.noise_shift) == ([8, 16, 32], 2, 2.0)
    assert config.export_sampler == SamplerSpec("dpm++", 12) and config.overwrite is False
    assert command_line("--block_out_channels", "8", "16", "32").block_out_channels == [8, 16, 32]
    # both spellings, as huggingface's HfArgumentParser takes them; a value after "--" is left alone
    assert command_line("--max-steps", "7", "--learning-rate=1e-3").learning_rate == 1e-3
    assert command_line("--max-steps", "7").max_steps == command_line("--max_steps", "7").max_steps == 7
    with pytest.raises(SystemExit):
        command_line("--max-step", "7")
    assert "unknown config keys ['max-step']" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    configs = {name: TrainConfig.from_dict(load_config_file(REPO / "configs" / f"{name}.yaml"))
               for name in ("tiny", "paper", "fast", "cpu", "quickstart")}
    assert configs["paper"].preset == "paper" and configs["paper"].batch_size == 64
    # make train-demo is the shipped recipe scaled down: the same network and block layout, on the bundled digits
    cpu, quick = configs["cpu"], configs["quickstart"]
    for key in ("preset", "patch_size", "block_out_channels", "num_past_frames", "num_current_frames",
                "prediction_type", "beta_schedule", "mixed_precision"):
        assert getattr(quick, key) == getattr(cpu, key), key
    assert quick.mnist_root == "bundled" and quick.max_steps * quick.batch_size < cpu.max_steps * cpu.batch_size / 10
    assert configs["cpu"].prediction_type == "sample" and configs["cpu"].mixed_precision == "auto"
    assert configs["fast"].preset == "fast" and configs["tiny"].mnist_root == "bundled"


# ----------------------------------------------------------------------------- loss pieces
def test_mask_probability_is_respected():
    keep = draw_keep_mask(20000, 0.3, torch.Generator().manual_seed(0))
    assert abs((~keep).float().mean().item() - 0.3) < 0.015
    assert draw_keep_mask(8, 0.0) is None


def test_min_snr_weights_by_hand():
    for prediction_type, expected in [("epsilon", lambda snr: min(snr, 5) / snr),
                                      ("v_prediction", lambda snr: min(snr, 5) / (snr + 1)),
                                      ("sample", lambda snr: min(snr, 5))]:
        scheduler = make_noise_scheduler("linear", prediction_type)
        t = torch.tensor([10, 500, 990])
        weights = min_snr_weights(scheduler, t, gamma=5.0)
        for ti, w in zip(t.tolist(), weights.tolist()):
            a = scheduler.alphas_cumprod[ti].item()
            assert w == pytest.approx(expected(a / (1 - a)), rel=1e-5)
    assert min_snr_weights(make_noise_scheduler("linear", "epsilon"), torch.tensor([10]), 5.0).item() < 0.1


def test_warmup_then_plateau_on_validation_losses():
    def schedule():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, make_lr_schedule("warmup_plateau", opt, warmup_steps=4, total_steps=100, factor=0.5,
                                     patience=1, threshold=0.01, min_lr=0.2)

    opt, ours = schedule()
    assert ours.get_last_lr() == [0.0]  # warm-up starts from zero, like diffusers' schedules
    for expected in (0.25, 0.5, 0.75):
        ours.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert ours.report(5.0) is False  # ignored during warm-up
    ours.step()
    ours.step()
    assert opt.param_groups[0]["lr"] == 1.0
    # patience 1: the second validation in a row without a 1% improvement halves the LR, down to 0.2
    losses = (1.0, 0.9, 0.95, 0.899, 0.9, 0.9, 0.5, 0.6, 0.7, 0.8, 0.9)
    expected = (1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2)
    cuts, resumed = [], None
    for i, (val, lr) in enumerate(zip(losses, expected)):
        cuts.append((resumed or ours).report(val))
        assert (opt2 if resumed else opt).param_groups[0]["lr"] == pytest.approx(lr), f"after validation {i}"
        if i == 4:  # resume here, one bad validation into a plateau: the optimizer's state brings the
            opt2, resumed = schedule()  # LR, the schedule's JSON state the rest
            opt2.load_state_dict(opt.state_dict())
            resumed.load_state_dict(json.loads(json.dumps(ours.state_dict())))
    assert cuts == [False, False, False, True, False, True, False, False, True, False, False]


def test_diffusers_schedule_state_round_trips_through_json():
    sched = make_lr_schedule("cosine", opt := torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                             warmup_steps=2, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    again = make_lr_schedule("cosine", opt2 := torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                             warmup_steps=2, total_steps=10)
    again.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    opt.step(), opt2.step()
    sched.step()
    again.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) and 0 < opt.param_groups[0]["lr"] < 1


# ------------------------------------------------------------------------------ whole runs
def test_run_exports_pipeline_card_gifs_and_logs(uninterrupted):
    out = uninterrupted
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and "bundled" in summary["data_source"]
    assert [v["step"] for v in summary["validations"]] == [2, 4, 6]
    best = min(summary["validations"], key=lambda v: v["loss"])
    assert (summary["weights_step"], summary["val_loss"]) == (best["step"], best["loss"])
    pipe = MCVDPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.config.default_num_frames == 10  # pipe(past) answers the task: 10 frames, rolled out 3 at a time
    exported = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    best_ckpt = load_file(out / "checkpoints" / f"checkpoint-{best['step']}" / "ema.safetensors")
    assert all(torch.equal(exported[k], best_ckpt[k]) for k in best_ckpt)  # the best EMA weights
    card = (out / "pipeline" / "README.md").read_text()
    assert "learning_rate: 0.001" in card and "plateau_patience: 0" in card and "{{" not in card
    assert f"validation loss {best['loss']:.4g}" in card and f"step {best['step']}" in card
    assert "bundled MNIST sample" in card and "Not evaluated yet" in card
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # the prediction GIFs: 2 validation clips as rows, ground truth and prediction as columns (64-px tiles
    # with a 2-px border, under a 28-px caption); the 2 past frames play, then the task's 10 predicted ones
    # (the model generates 3 per block: rolled out)
    gifs = sorted((out / "samples").glob("*.gif"))
    assert [g.name for g in gifs] == ["step-0000002.gif", "step-0000004.gif", "step-0000006.gif"]
    frames = imageio.mimread(gifs[-1])
    assert len(frames) == 2 + 10 and frames[0].shape[:2] == (28 + 2 * 68, 2 * 68)
    assert not np.array_equal(frames[2], frames[3])  # the clips move
    # TensorBoard: the training loss at every step, the validation losses the summary records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [round(e.value, 5) for e in events.Scalars("val/loss")] == [round(v["loss"], 5)
                                                                       for v in summary["validations"]]
    # every validation also rolls the model out to 10 frames on its 8 clips (fewer than val_rollout_clips)
    assert [round(e.value, 5) for e in events.Scalars("val/rollout_ssim_f10")] == [
        round(v["rollout_ssim_f10"], 5) for v in summary["validations"]]
    assert all(0 < v["rollout_mse"] < 1 and -1 < v["rollout_ssim"] < 1 for v in summary["validations"])


def test_validation_loss_is_fixed_and_uses_validation_digits(uninterrupted):
    config = small_config(uninterrupted)
    pipe = MCVDPipeline.from_pretrained(uninterrupted / "pipeline")
    from mcvd_diffusers.data.mnist import load_mnist

    val = ValidationSet(load_mnist("val", root="bundled"), pipe.unet, config)
    again = ValidationSet(load_mnist("val", root="bundled"), pipe.unet, config)
    assert torch.equal(val.clips, again.clips) and torch.equal(val.noise, again.noise)
    assert val.timesteps.min() < 100 and val.timesteps.max() > 900  # spread over the schedule
    loss = val.loss(pipe.unet, make_noise_scheduler(), Accelerator(cpu=True), batch_size=3)
    summary = json.loads((uninterrupted / "train_summary.json").read_text())
    assert loss == pytest.approx(summary["val_loss"], rel=1e-5)  # reproduces the number the run chose on


def _interrupt_data_at(monkeypatch, call: int, batch_size: int = 2):
    original, calls = MovingMNIST.sample, {"n": 0}

    def sample(self, n, generator=None, *args, **kwargs):
        if n == batch_size:
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt("Ctrl-C")
        return original(self, n, generator, *args, **kwargs)

    monkeypatch.setattr(MovingMNIST, "sample", sample)


def test_interrupted_and_resumed_run_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_data_at(monkeypatch, call=5)  # Ctrl-C during step 5: checkpoints 2 and 4 exist
    with pytest.raises(KeyboardInterrupt):
        train(small_config(out))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ValueError, match="pass resume_from_checkpoint=latest"):
        train(small_config(out))  # the same command without resume refuses to clobber the run
    train(small_config(out, resume_from_checkpoint="latest"))
    assert_same_run(uninterrupted, out)


def test_killed_while_saving_keeps_previous_checkpoint(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original, calls = Accelerator.save_state, {"n": 0}

    def dying_save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the save of step 4 dies half-way
            Path(output_dir, "model.safetensors").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt("killed")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dying_save_state)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(out))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert (out / "checkpoints" / ".checkpoint-4.partial").is_dir()
    train(small_config(out, resume_from_checkpoint="latest"))
    assert not (out / "checkpoints" / ".checkpoint-4.partial").exists()
    assert_same_run(uninterrupted, out)


def test_resume_refuses_an_incompatible_config_and_extends_a_finished_run(uninterrupted, tmp_path, mnist_dir,
                                                                             monkeypatch):
    import shutil

    from accelerate.state import AcceleratorState

    from mcvd_diffusers import runtime

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    with pytest.raises(ValueError, match=r"cannot resume .*learning_rate: checkpoint 0.001, now 0.002"):
        train(small_config(out, learning_rate=2e-3, resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match=r"cannot resume .*adam_beta2: checkpoint 0.999, now 0.99"):
        train(small_config(out, adam_beta2=0.99, resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match=r"the training digits \(MNIST files in .*\) are not the ones .*bundled MNIST"):
        train(small_config(out, mnist_root=str(mnist_dir), resume_from_checkpoint="latest"))  # may move, not change
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        train(small_config(out, resume_from_checkpoint=str(out / "checkpoints" / "checkpoint-5")))
    # the run trained in fp32 ("no"): auto may resume it where auto resolves to fp32, not where it resolves to bf16
    AcceleratorState._reset_state(reset_partial_state=True)  # Accelerate fixes one precision per process
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    with pytest.raises(ValueError, match=r"cannot resume .*mixed_precision: checkpoint 'no', now 'auto' \(resolves "
                                         r"to 'bf16' here\)"):
        train(small_config(out, max_steps=8, mixed_precision="auto", resume_from_checkpoint="latest"))
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    train(small_config(out, max_steps=8, mixed_precision="auto", resume_from_checkpoint="latest"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 8 and [v["step"] for v in summary["validations"]] == [2, 4, 6, 8]
    assert (summary["precision"]["requested"], summary["precision"]["resolved"]) == ("auto", "no")


def test_a_loss_that_jumps_and_stays_up_is_warned_about_once(tmp_path, monkeypatch):
    from mcvd_diffusers import trainer

    config = dict(max_steps=40, log_every=10, validate_every=20, checkpoint_every=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(small_config(tmp_path / "steady", **config))
    assert not [w for w in caught if "diverged" in str(w.message)]

    original, calls = trainer.diffusion_loss, {"n": 0}

    def jumping_loss(*args, **kwargs):  # what runs at too high a learning rate did: a jump that never came back
        calls["n"] += 1
        return original(*args, **kwargs) * (3 if calls["n"] > 20 else 1)

    monkeypatch.setattr(trainer, "diffusion_loss", jumping_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(small_config(tmp_path / "jumped", **config))
    diverged = [str(w.message) for w in caught if "diverged" in str(w.message)]
    assert len(diverged) == 1, diverged  # once, though steps 30 and 40 are both up
    assert re.search(r"rose to [\d.]+ at step 30, over twice its lowest mean \([\d.]+ at step (10|20)\)", diverged[0])
    assert (tmp_path / "jumped" / "pipeline").is_dir()  # a warning: the run itself goes on


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from mcvd_diffusers import trainer

    out = tmp_path / "run"
    original, calls = trainer.diffusion_loss, {"n": 0}

    def diverging_loss(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(trainer, "diffusion_loss", diverging_loss)
    with pytest.raises(FloatingPointError, match=r"loss became nan .*Last good checkpoint: .*checkpoint-2"):
        train(small_config(out))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    ema = load_file(out / "checkpoints" / "checkpoint-2" / "ema.safetensors")
    assert all(torch.isfinite(v).all() for v in ema.values())
    assert not (out / "pipeline").exists()


def test_export_on_demand_and_fake_hub_upload(uninterrupted, tmp_path, monkeypatch):
    folder = export_checkpoint(uninterrupted / "checkpoints" / "checkpoint-4", tmp_path / "export-4")
    ema = load_file(uninterrupted / "checkpoints" / "checkpoint-4" / "ema.safetensors")
    pipe = MCVDPipeline.from_pretrained(folder)
    assert all(torch.equal(p, ema[name]) for name, p in pipe.unet.named_parameters())
    card = (folder / "README.md").read_text()
    assert "EMA weights of step 4" in card and "bundled MNIST sample" in card
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.config.default_num_inference_steps == 50
    assert "minutes of training wall time" in card and "command(s): not recorded (the Python API)" in card

    # another sampler on demand: its scheduler and default step count travel with the folder
    other = MCVDPipeline.from_pretrained(export_checkpoint(uninterrupted / "checkpoints" / "checkpoint-4",
                                                           tmp_path / "export-dpm", export_sampler="dpm++:7"))
    assert type(other.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert other.config.default_num_inference_steps == 7 and other.scheduler.config.thresholding
    with pytest.raises(ValueError, match="export_sampler must be NAME:STEPS"):
        export_checkpoint(uninterrupted / "checkpoints" / "checkpoint-4", tmp_path / "bad", export_sampler="ddim")

    from huggingface_hub import HfApi

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, repo_id, folder_path, **kw: uploads.append(
        (repo_id, sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()),
         (Path(folder_path) / "README.md").read_text())))
    out = tmp_path / "pushed"
    train(small_config(out, max_steps=2, push_to_hub=True, hub_model_id="someone/mcvd-tiny"))
    [(repo_id, files, card)] = uploads
    assert repo_id == "someone/mcvd-tiny"
    assert files == ["README.md", "checksums.json", "integrity.py", "model_index.json", "pipeline_mcvd.py",
                     "scheduler/scheduler_config.json", "training_info.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors", "unet/unet_mcvd.py"]  # no raw checkpoints
    assert 'MCVDPipeline.from_pretrained("someone/mcvd-tiny")' in card and "# someone/mcvd-tiny" in card

    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        push_to_hub(tmp_path, "someone/mcvd-tiny")  # not a pipeline folder
    (folder / "training_info.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no training_info.json: it was not exported by"):
        push_to_hub(folder, "someone/mcvd-tiny")  # a pipeline saved by hand has no card to upload

    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(RuntimeError, match="The export is kept; push it again with: python train_mcvd.py --push"):
        push_to_hub(out / "pipeline", "someone/mcvd-tiny")


def test_training_with_the_cpu_fast_paths_and_accumulation(tmp_path, monkeypatch, capsys):
    from mcvd_diffusers import runtime

    # auto on a CPU with native bf16 (mocked, so that every machine runs this as bf16)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(runtime, "cpu_model_name", lambda: "Test CPU 9000")
    config = small_config(tmp_path / "run", max_steps=2, mixed_precision="auto", channels_last=True,
                          fused_adamw=True, gradient_accumulation_steps=2, min_snr_gamma=5.0, lr_scheduler="cosine",
                          sample_every=2, adam_beta2=0.99)
    pipe = MCVDPipeline.from_pretrained(train(config))
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    set_seed(config.seed)  # the weights the run started from
    initial = build_unet(config).state_dict()
    trained = pipe.unet.state_dict()
    moved = [name for name, value in initial.items() if not torch.equal(value, trained[name])]
    assert len(moved) > 0.9 * len(initial)  # 2 steps of 2 accumulated bf16 micro-batches moved the (EMA) weights
    assert "precision: bf16 (auto: this CPU has native bf16: Test CPU 9000)\n" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["config"]["mixed_precision"] == "auto" and summary["samples_seen"] == 2 * 2 * 2
    recorded = {"requested": "auto", "resolved": "bf16", "cpu_model": "Test CPU 9000", "cpu_native_bf16": True}
    assert recorded.items() <= summary["precision"].items()
    info = json.loads((tmp_path / "run" / "pipeline" / "training_info.json").read_text())
    assert info["precision"] == summary["precision"]
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert "- precision: bf16 (auto: this CPU has native bf16: Test CPU 9000)\n- config:" in card
    assert (tmp_path / "run" / "samples" / "step-0000002.gif").stat().st_size > 1000
    optimizer = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "optimizer.bin", weights_only=True)
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.99)  # the config's, not AdamW's default (0.9, 0.999)


def _launch(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    return subprocess.run([str(accelerate), "launch", *args, str(REPO / "train_mcvd.py"), "--config",
                           str(REPO / "configs" / "tiny.yaml"), "--output_dir", str(tmp_path / "run"),
                           "--max_steps", "4", "--image_size", "32", "--batch_size", "2", "--val_clips", "6",
                           "--validate_every", "2", "--checkpoint_every", "2", "--sample_every", "4",
                           "--warmup_steps", "1", "--log_every", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_two_process_cpu_run(tmp_path):
    result = _launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", "29517"], tmp_path, ACCELERATE_USE_CPU="1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["samples_seen"] == 4 * 2 * 2
    assert len(set(summary["data_seeds"])) == 2  # each process draws its own clips
    ckpt = out / "checkpoints" / "checkpoint-4"
    assert {p.name for p in ckpt.iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl", "generator_0.safetensors",
                                                "generator_1.safetensors", "model.safetensors", "ema.safetensors"}
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1  # only the main process logs
    assert result.stdout.count("saved the pipeline") == 1
    # the validation loss was reduced over both processes' shares: one process gets the same number
    config = TrainConfig.from_dict(summary["config"])
    pipe = MCVDPipeline.from_pretrained(out / "pipeline")
    from mcvd_diffusers.data.mnist import load_mnist

    loss = ValidationSet(load_mnist("val", root="bundled"), pipe.unet, config).loss(
        pipe.unet, make_noise_scheduler(), Accelerator(cpu=True), batch_size=4)
    assert loss == pytest.approx(summary["val_loss"], rel=1e-4)


def test_accelerate_cpu_flag_that_starts_one_process_is_refused(tmp_path):
    result = _launch(["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no"], tmp_path)
    assert result.returncode != 0
    assert "started 1 process, not the 2 asked for" in result.stderr and "--multi_gpu" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_configs_of_earlier_versions_holding_a_removed_key_switched_off_still_load_and_resume(tmp_path):
    # the general model's export was written before the key was removed (the prediction model was re-exported since)
    shipped = json.loads((REPO / "checkpoints" / "mmnist-general" / "training_info.json").read_text())["config"]
    assert shipped["residual_to_last_past"] is False
    config = TrainConfig.from_dict(shipped)
    kept = {k: v for k, v in shipped.items() if k != "residual_to_last_past"}
    assert kept.items() <= config.to_dict().items()  # every other key as recorded (later keys at their defaults)
    check_resume_compatible(shipped, config, tmp_path / "checkpoint-10")  # the checkpoint's config: resumable
    switched_on = {**shipped, "residual_to_last_past": True}
    with pytest.raises(ValueError, match=r"\['residual_to_last_past'\] were removed"):
        TrainConfig.from_dict(switched_on)
    with pytest.raises(ValueError, match="cannot train or resume a run that switches them on"):
        check_resume_compatible(switched_on, config, tmp_path / "checkpoint-10")
