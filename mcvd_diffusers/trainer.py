"""The training loop behind train_mcvd.py, on Accelerate. ``output_dir`` holds checkpoints/checkpoint-<step>/
(checkpointing.py), best/ (the pipeline of the lowest validation loss so far), pipeline/ (the export, with its
model card), samples/step-<step>.gif (past | truth | prediction), logs/ (TensorBoard) and train_summary.json."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .checkpointing import (list_checkpoints, load_checkpoint, register_checkpoint_hooks,
                            remove_incomplete, replace_dir, resolve_checkpoint, save_checkpoint)
from .config import TrainConfig, build_noise_scheduler, build_unet, check_resume_compatible, training_timesteps
from .data.mnist import load_mnist
from .data.moving_mnist import MovingMNIST, digits_fingerprint
from .export import save_pipeline, training_info
from .hub import push_to_hub, write_model_card
from .interrupt import StopOnSignal, TrainingInterrupted
from .losses import diffusion_loss
from .lr_schedules import make_lr_schedule
from .unet.unet_mcvd import MCVDUNet2DModel
from .pipeline_mcvd import MCVDPipeline
from .run_lock import hold_run_folder
from .runtime import describe_precision, maybe_compile, precision_info, to_channels_last
from .validation import ValidationSet, can_roll_out, write_sample_gif

RUN_MARKER = ".mcvd-run"  # written into every output_dir this project's training creates


def train(config: TrainConfig, command: str | None = None) -> Path:
    """Trains (or resumes) a run and returns the folder of the exported pipeline (EMA weights).
    ``command``: the command line that started it, for the model card. The main process holds ``output_dir``
    throughout: a second run there is refused (RunFolderInUse)."""
    is_main = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process  # as _make_accelerator
    with hold_run_folder(config.output_dir, "train_mcvd.py", is_main):
        return _train(config, command)


@dataclasses.dataclass
class Run:
    """What one training run works with: built by ``_setup``, advanced by the loop in ``_train``."""

    config: TrainConfig
    accelerator: Accelerator
    unet: torch.nn.Module  # as Accelerate prepared it (DDP-wrapped with several processes)
    model: MCVDUNet2DModel  # the same weights, unwrapped
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    scheduler: object  # the noise scheduler
    data: MovingMNIST
    validation: ValidationSet
    generator: torch.Generator
    data_source: str
    train_fingerprint: str
    history: dict
    step: int
    seconds_before: float  # training time of earlier starts of the run
    timesteps: torch.Tensor | None = None  # what training draws t from; None: the whole schedule
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)


def _train(config: TrainConfig, command: str | None) -> Path:
    run = _setup(config, command)
    accelerator, is_main = run.accelerator, run.accelerator.is_main_process
    progress = tqdm(total=config.max_steps, initial=run.step, desc="train", disable=not is_main)
    meter = LossMeter(run)
    with StopOnSignal() as stop:  # SIGTERM / Ctrl-C: finish the step, save a checkpoint, stop
        while run.step < config.max_steps:
            run.unet.train()
            for _ in range(config.gradient_accumulation_steps):
                with accelerator.accumulate(run.unet):
                    clip = run.data.sample(config.batch_size, run.generator)
                    with accelerator.autocast():
                        loss = diffusion_loss(run.unet, run.scheduler, clip, run.generator, config.min_snr_gamma,
                                              config.past_noise_augment, run.timesteps)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        meter.grad_norm = accelerator.clip_grad_norm_(run.unet.parameters(), config.grad_clip)
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                meter.add(loss)
            run.lr_schedule.step()
            run.ema.step(run.model.parameters())
            run.step += 1
            progress.update()
            last = run.step == config.max_steps
            validate = config.validate_every > 0 and (run.step % config.validate_every == 0 or last)
            checkpoint = (config.checkpoint_every > 0 and run.step % config.checkpoint_every == 0) or last
            if run.step % config.log_every == 0 or validate or checkpoint:
                meter.log(progress)  # stops on a NaN loss before anything is validated or saved
            if validate:
                _validate(run, progress)
            if is_main and config.sample_every > 0 and (run.step % config.sample_every == 0 or last):
                with ema_weights(run):
                    write_sample_gif(run.model, run.scheduler, run.validation, config,
                                     run.out / "samples" / f"step-{run.step:07d}.gif")
            signum = stop.requested(accelerator)
            if checkpoint or signum:
                saved = _save_checkpoint(run)
            if signum:
                progress.close()
                accelerator.end_training()  # flushes the logs
                raise TrainingInterrupted(signum, run.step, saved)
    progress.close()
    return _finish(run)


def _setup(config: TrainConfig, command: str | None) -> Run:
    """The accelerator, run folder, model, data, optimizer and EMA, restored from the checkpoint to resume."""
    accelerator, precision = _make_accelerator(config)
    accelerator.print(describe_precision(precision))
    device = accelerator.device
    resume, resume_state = _prepare_output_dir(config, accelerator, Path(config.output_dir), precision["resolved"])
    set_seed(config.seed)
    unet = build_unet(config)
    if config.init_unet_from and resume is None:
        unet.warm_start_from(_load_unet(config.init_unet_from))
        accelerator.print(f"warm start: weights from {config.init_unet_from}")
    parameter_names = [name for name, _ in unet.named_parameters()]
    scheduler, timesteps = build_noise_scheduler(config), training_timesteps(config)
    if timesteps is not None:
        accelerator.print(f"timesteps: only {config.export_sampler}'s grid, {timesteps.tolist()}")
    train_digits = load_mnist("train", root=config.mnist_root)
    train_fingerprint = digits_fingerprint(train_digits.images)  # a resumed run must draw the same digits
    if resume is not None and resume_state["train_digits"] != train_fingerprint:
        raise ValueError(f"cannot resume {resume}: the training digits ({train_digits.source}) are not the ones the "
                         f"checkpoint was trained on ({resume_state['data_source']}); mnist_root may "
                         "move, not change what it holds")
    data = MovingMNIST(train_digits.images.to(device), image_size=config.image_size, num_digits=config.num_digits,
                       num_frames=unet.clip_length, motion=config.motion, bounce=config.bounce)
    validation = ValidationSet(load_mnist("val", root=config.mnist_root), unet, config)
    accelerator.print(f"data: {train_digits.source}; validation: {len(validation)} clips of MNIST validation digits")
    accelerator.print(f"model: preset {config.preset}, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
                      f"parameters; {accelerator.num_processes} process(es) on {device}")
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3,
                   model_cls=MCVDUNet2DModel, model_config=unet.config)
    if config.channels_last:
        to_channels_last(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                  betas=(config.adam_beta1, config.adam_beta2), fused=config.fused_adamw or None)
    # Not passed to accelerator.prepare, which would step it once per process: it counts optimizer steps.
    lr_schedule = make_lr_schedule(config.lr_scheduler, optimizer, warmup_steps=config.warmup_steps,
                                   total_steps=config.max_steps, factor=config.plateau_factor, min_lr=config.min_lr,
                                   patience=config.plateau_patience, threshold=config.plateau_threshold)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    model = accelerator.unwrap_model(unet)
    ema.to(device)
    generator = torch.Generator(device).manual_seed(_rank_seed(config.seed, accelerator.process_index))
    register_checkpoint_hooks(accelerator, ema, parameter_names, generator)  # save_state writes them too
    history, step = {"validations": [], "best": None, "train_loss": None}, 0
    if resume is not None:
        load_checkpoint(accelerator, resume, resume_state, model, ema, parameter_names, generator)
        lr_schedule.load_state_dict(resume_state["lr_schedule"])
        step, history = resume_state["step"], resume_state["history"]
        accelerator.print(f"resumed from {resume} at step {step}")
    if config.report_to == "tensorboard":
        accelerator.init_trackers("logs", config={k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                                  for k, v in config.to_dict().items()})
    if config.compile:
        _compile(model, unet, scheduler, data, optimizer, accelerator, config)
    # wall time and commands over every start of the run (resumes add theirs), for the model card
    history["commands"] = history.get("commands", []) + ([command] if command else [])
    history["precision"] = precision  # this start's (a resume on other hardware may resolve auto otherwise)
    return Run(config, accelerator, unet, model, ema, optimizer, lr_schedule, scheduler, data, validation,
               generator, train_digits.source, train_fingerprint, history, step, history.get("train_seconds") or 0.0,
               timesteps)


def _load_unet(folder: str) -> MCVDUNet2DModel:
    """The UNet of a pipeline folder (its files verified) or of a UNet folder."""
    path = Path(folder)
    if (path / "model_index.json").is_file():
        return MCVDPipeline.from_pretrained(path).unet
    if (path / "config.json").is_file():
        return MCVDUNet2DModel.from_pretrained(path)
    raise FileNotFoundError(f"init_unet_from: {folder} is neither a pipeline folder (model_index.json) nor a UNet "
                            "folder (config.json)")


class LossMeter:
    """The mean training loss since the last log, with the step rate and the last gradient norm."""

    def __init__(self, run: Run):
        self.run, self.grad_norm = run, None
        self.lowest, self.warned = (math.inf, run.step), False
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.total = torch.zeros((), device=self.run.accelerator.device)
        self.micro_batches, self.since_step, self.since = 0, self.run.step, now

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.micro_batches += 1

    def log(self, progress) -> None:
        """Logs the mean; stops on a non-finite one, and warns once when a mean over 10+ batches doubles the
        lowest such mean: runs at too high a learning rate jumped so (.05 to .15) and never came back."""
        run, now = self.run, time.perf_counter()
        mean = run.accelerator.reduce(self.total, "mean").item() / self.micro_batches
        if not math.isfinite(mean):
            kept = list_checkpoints(run.out / "checkpoints")
            raise FloatingPointError(
                f"the training loss became {mean} between steps {self.since_step} and {run.step}; stopped. Last "
                f"good checkpoint: {kept[-1] if kept else 'none'} (resume it with a lower learning_rate, grad_clip, "
                "or bf16 instead of fp16)")
        run.history["train_loss"] = mean
        if self.micro_batches >= 10:  # fewer batches are too noisy to compare
            if mean > 2 * self.lowest[0] and not self.warned:
                self.warned = True  # the mean is reduced across processes: every process sees it, the main says it
                if run.accelerator.is_main_process:
                    warnings.warn(f"the training loss rose to {mean:.4g} at step {run.step}, over twice its lowest "
                                  f"mean ({self.lowest[0]:.4g} at step {self.lowest[1]}): the run has probably "
                                  "diverged; resume an earlier checkpoint with a lower learning_rate", RuntimeWarning)
            self.lowest = min(self.lowest, (mean, run.step))
        samples = (run.step - self.since_step) * run.config.batch_size * run.config.gradient_accumulation_steps
        logs = {"train/loss": mean, "train/lr": run.lr_schedule.get_last_lr()[0],
                "train/grad_norm": float(self.grad_norm),
                "train/samples_per_second": samples * run.accelerator.num_processes / (now - self.since)}
        run.accelerator.log(logs, step=run.step)
        progress.set_postfix(loss=f"{mean:.4f}", lr=f"{logs['train/lr']:.2e}")
        self._reset(now)


@contextlib.contextmanager
def ema_weights(run: Run):
    """The model holds the EMA weights inside the block, its training weights again after it."""
    run.ema.store(run.model.parameters())
    run.ema.copy_to(run.model.parameters())
    try:
        yield
    finally:
        run.ema.restore(run.model.parameters())


def _info(run: Run, best: dict | None) -> dict:
    """training_info.json of an export of the run now: the weights of validation ``best``, or (None) the last."""
    run.history["train_seconds"] = run.seconds_before + time.perf_counter() - run.started
    return training_info(run.config, run.data_source, run.step, run.accelerator.num_processes, run.history,
                         best["step"] if best else run.step, best["loss"] if best else None)


def _save_checkpoint(run: Run) -> Path:
    run.history["train_seconds"] = run.seconds_before + time.perf_counter() - run.started
    ema_counters = {k: v for k, v in run.ema.state_dict().items() if k != "shadow_params"}
    trainer_state = {"config": run.config.to_dict(), "data_source": run.data_source,
                     "train_digits": run.train_fingerprint, "lr_schedule": run.lr_schedule.state_dict(),
                     "history": run.history, "ema": ema_counters}
    return save_checkpoint(run.accelerator, run.out / "checkpoints", run.step, trainer_state,
                           run.config.checkpoints_total_limit)


def _validate(run: Run, progress) -> None:
    """The validation loss (and 10-frame rollout scores) of the EMA weights; the best so far is exported."""
    config, accelerator, is_main = run.config, run.accelerator, run.accelerator.is_main_process
    progress.set_description(f"validating step {run.step}")  # the bar may already stand at 100%
    with ema_weights(run):
        val_loss = run.validation.loss(run.model, run.scheduler, accelerator, config.val_batch_size)
    cut = run.lr_schedule.report(val_loss)
    rollout = {}
    if config.val_rollout_clips > 0 and can_roll_out(run.model):  # the same clips on every process
        with ema_weights(run):
            rollout = run.validation.rollout_scores(run.model, run.scheduler, config.sample_sampler,
                                                    config.val_rollout_clips)
    run.history["validations"].append({"step": run.step, "loss": val_loss,
                                       **{f"rollout_{k}": v for k, v in rollout.items()}})
    accelerator.log({"val/loss": val_loss, **{f"val/rollout_{k}": v for k, v in rollout.items()}}, step=run.step)
    if is_main:
        tqdm.write(f"step {run.step}: validation loss {val_loss:.5f}" + (", learning rate cut" if cut else "")
                   + "".join(f", 10-frame rollout {k} {v:.4f}" for k, v in rollout.items()
                             if k in ("mse", "ssim", "ssim_f10")))
    if run.history["best"] is None or val_loss < run.history["best"]["loss"]:
        run.history["best"] = {"step": run.step, "loss": val_loss}
        if is_main:
            with ema_weights(run):
                save_pipeline(run.model, run.scheduler, run.out / "best", _info(run, run.history["best"]),
                              config.export_sampler)
    progress.set_description("train")


def _finish(run: Run) -> Path:
    """pipeline/ (the best validation step's EMA weights, else the last), train_summary.json, the Hub upload."""
    config, accelerator, out = run.config, run.accelerator, run.out
    if accelerator.is_main_process:
        pipeline_dir, best = out / "pipeline", run.history["best"]
        accelerator.print(f"exporting the pipeline to {pipeline_dir} (with its model card)")
        if best is not None and (out / "best").is_dir():  # best/'s export, with a card of the whole run
            tmp = out / ".pipeline.copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(out / "best", tmp)
            write_model_card(tmp, {**json.loads((tmp / "training_info.json").read_text()),
                                   **_info(run, best)}, config.hub_model_id or str(pipeline_dir))
            replace_dir(tmp, pipeline_dir)
        else:
            with ema_weights(run):
                save_pipeline(run.model, run.scheduler, pipeline_dir, _info(run, None), config.export_sampler)
        summary = {**_info(run, best), "validations": run.history["validations"],
                   "seconds": time.perf_counter() - run.started, "device": str(accelerator.device),
                   "data_seeds": [_rank_seed(config.seed, r) for r in range(accelerator.num_processes)]}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved the pipeline (EMA weights of step {summary['weights_step']}) to {pipeline_dir}")
        if config.push_to_hub:
            accelerator.print(f"uploaded to {push_to_hub(pipeline_dir, config.hub_model_id, config.hub_private)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "pipeline"


def _make_accelerator(config: TrainConfig) -> tuple[Accelerator, dict]:
    # Refuse a precision the device cannot run before Accelerate fixes its process-wide state.
    # (cpu= as Accelerator reads it: a PartialState made without it would pin a CPU run to one process.)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    # mixed_precision auto is resolved here, once: Accelerate is given the precision it resolves to.
    precision = precision_info(config.mixed_precision, state.device)
    accelerator = Accelerator(mixed_precision=precision["resolved"],
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              log_with="tensorboard" if config.report_to == "tensorboard" else None,
                              project_dir=config.output_dir)
    # `accelerate launch --cpu --num_processes N` starts one process (without MPI): refuse to train on one
    # process the user did not ask for. The launcher passes N to no environment variable: read its command line.
    if accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        with contextlib.suppress(psutil.Error, AttributeError):
            asked = re.findall(r"--num_processes[= ](\d+)(?= |$)", " ".join(psutil.Process().parent().cmdline()))
            if asked and int(n := asked[-1]) > 1:
                raise ValueError(f"accelerate launch --cpu started 1 process, not the {n} asked for: Accelerate runs "
                                 "several CPU processes with torchrun and gloo only as "
                                 f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} ...`")
    return accelerator, precision


def _describe(folder: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _prepare_output_dir(config: TrainConfig, accelerator: Accelerator, out: Path, precision: str
                        ) -> tuple[Path | None, dict | None]:
    """Finds the checkpoint to resume and its verified trainer state ((None, None): a fresh start), checks the
    folder, marks it as a run's. ``precision``: what this run's mixed_precision resolved to. Only a folder this
    project's training created (it holds RUN_MARKER) is ever emptied; anything else in the way is refused."""
    spec, checkpoints_dir = config.resume_from_checkpoint, out / "checkpoints"
    resume, state = (resolve_checkpoint(spec, checkpoints_dir) if spec else None) or (None, None)
    clear = None  # why out must be emptied first
    if resume is not None:
        recorded = state["history"].get("precision")  # absent from checkpoints saved before mixed_precision auto
        saved_precision = recorded.get("resolved") if isinstance(recorded, dict) else None
        check_resume_compatible(state["config"], config, resume, precision, saved_precision)
    elif out.exists() and any(out.iterdir()):  # every process checks, before any change
        if not (out / RUN_MARKER).is_file():
            raise ValueError(f"output_dir {out} is not empty and was not created by mcvd-diffusers training (no "
                             f"{RUN_MARKER} marker); it holds: {_describe(out)}. It is never deleted: choose "
                             "another output_dir, or empty it yourself")
        if config.overwrite:
            clear = f"overwrite=true: replacing the run in {out}"
        elif spec == "latest" and (out / "pipeline").is_dir():
            raise ValueError(f"output_dir {out} holds a finished run's pipeline/ but no checkpoint to resume; pass "
                             "overwrite=true to replace that run, or choose another output_dir")
        elif spec == "latest":  # killed before its first checkpoint (only logs, GIFs, best/ or a .partial)
            clear = f"{out} holds no complete checkpoint to resume ({_describe(out)}): starting a fresh run there"
        else:
            raise ValueError(f"output_dir {out} already holds another run ({_describe(out)}); pass "
                             "resume_from_checkpoint=latest to continue it, or overwrite=true to replace it")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if clear:
            accelerator.print(clear)
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("an output_dir of mcvd-diffusers training: overwrite=true may delete it\n")
        remove_incomplete(checkpoints_dir)  # saves and prunes that were interrupted
    accelerator.wait_for_everyone()
    return resume, state


def _compile(model, unet, scheduler, data, optimizer, accelerator: Accelerator, config: TrainConfig) -> None:
    """Compiles on a throw-away batch (its own RNG): an unsupported setup falls back to eager before training."""
    probe = torch.Generator(accelerator.device).manual_seed(-1 & 0xFFFF)

    def probe_step():
        with accelerator.autocast():
            loss = diffusion_loss(unet, scheduler, data.sample(config.batch_size, probe), probe)
        accelerator.backward(loss)
        optimizer.zero_grad(set_to_none=True)

    maybe_compile(model, probe_step)


def _rank_seed(seed: int, process_index: int) -> int:
    return (seed << 16) + process_index  # one data-and-noise stream per process
