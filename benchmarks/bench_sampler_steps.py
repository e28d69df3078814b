"""How many sampling steps does a trained pipeline need? Quality and batch-1 latency per sampler.

usage: python benchmarks/bench_sampler_steps.py --model checkpoints/mmnist-5to10
           [--samplers ddim:5 ddim:10 ddim:20 ddim:50 dpm++:10 dpm++:20] [--val-clips 64] [--samples 2]
           [--mnist-root DIR] [--precision fp32] [--out FILE.json]

The clips come from MNIST *validation* digits, drawn as training validates (the pipeline's own
training config, training_info.json), never from the test set: a shipped step count chosen here
is not tuned on the test clips. Every sampler predicts the 10 frames after the past, block by block
(``--samplers ddim:10`` is 10 steps per block) and is scored as eval_mcvd.py scores the test clips:
MSE, SSIM, binarized SSIM, LPIPS-alex and -vgg, and digit identity at the validation digits' true
positions. Latency: one 10-frame prediction at batch 1 (median of 5 runs after a warm-up), on this
machine's threads.
"""

import argparse
import json
from pathlib import Path

import torch
from common import (add_threads_option, apply_threads, digit_scores, environment, median_seconds, metrics_in_chunks,
                    print_table, score, split_past_target, write_json)

from mcvd_diffusers.cli import FlagParser
from mcvd_diffusers import MCVDPipeline
from mcvd_diffusers.data.mnist import load_mnist
from mcvd_diffusers.digit_classifier import DigitIdentity
from mcvd_diffusers.evaluation import copy_last_frame
from mcvd_diffusers.metrics import FrameMetrics
from mcvd_diffusers.runtime import autocast, resolve_precision
from mcvd_diffusers.schedulers import SamplerSpec
from mcvd_diffusers.config import TrainConfig
from mcvd_diffusers.validation import PREDICTED_FRAMES, ValidationSet

METRICS = ("mse", "ssim", "ssim_binarized", "lpips_alex", "lpips_vgg")


def main():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pipeline folder exported by train_mcvd.py")
    parser.add_argument("--samplers", nargs="+", default=["ddim:5", "ddim:10", "ddim:20", "ddim:50", "dpm++:10",
                                                           "dpm++:20"])
    parser.add_argument("--val-clips", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2, help="samples per clip")
    parser.add_argument("--mnist-root", default=None, help="MNIST folder (default: the training config's)")
    parser.add_argument("--precision", default="fp32", help="autocast for the UNet: fp32, bf16 or auto (bf16 where the "
                                                             "CPU runs it natively, else fp32)")
    parser.add_argument("--out", default=None)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(parser, args)
    try:
        samplers = [SamplerSpec.parse(spec) for spec in args.samplers]
        precision = resolve_precision(args.precision, "cpu", fp32="fp32")  # what runs, and what the JSON records
    except ValueError as e:
        parser.error(str(e))
    if args.val_clips < 1 or args.samples < 1:
        parser.error("--val-clips and --samples must be >= 1")
    info_file = Path(args.model) / "training_info.json"
    if not info_file.is_file():
        parser.error(f"{args.model} has no training_info.json: this needs a pipeline exported by train_mcvd.py")
    values = json.loads(info_file.read_text())["config"]
    values.update(val_clips=args.val_clips, sample_clips=1)
    if args.mnist_root:
        values["mnist_root"] = args.mnist_root
    config = TrainConfig.from_dict(values)

    pipe = MCVDPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    unet, trained = pipe.unet.eval(), pipe.scheduler
    validation = ValidationSet(load_mnist("val", root=config.mnist_root), unet, config)
    clips, num_past = validation.clips, unet.config.num_past_frames
    frame_metrics = FrameMetrics(metrics=METRICS)
    # digit identity as eval_mcvd.py scores it, at the validation digits' true positions
    digits = DigitIdentity(validation.positions[:, num_past : num_past + PREDICTED_FRAMES], validation.labels)
    past, target = split_past_target(unet, clips)
    copy_last = copy_last_frame(past, target.shape[1])
    rows = [{"sampler": "copy last frame",
             **{k: v.mean().item() for k, v in metrics_in_chunks(frame_metrics, copy_last, target).items()},
             **digit_scores(digits, copy_last)}]
    for sampler in samplers:
        spec, steps = str(sampler), sampler.steps
        with autocast(precision, "cpu"):
            scores = score(unet, trained, clips, spec, frame_metrics, samples=args.samples, digits=digits)
            timed = MCVDPipeline(unet=unet, scheduler=sampler.build(trained.config))
            timed.set_progress_bar_config(disable=True)
            latency = median_seconds(lambda: timed(past[:1], num_frames=target.shape[1], num_inference_steps=steps),
                                     torch.device("cpu"), 5)
        rows.append({"sampler": spec, "steps": steps, "seconds_batch1": latency, **scores})
        print(f"{spec}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if k != "sampler"), flush=True)
    print(f"{args.val_clips} validation clips x {args.samples} samples, {precision}, "
          f"{torch.get_num_threads()} threads:")
    print_table(rows, [("sampler", "sampler"), ("seconds_batch1", "s/video (batch 1)"), ("mse", "MSE"),
                       ("ssim", "SSIM"), ("ssim_f1", "SSIM f1"), ("ssim_f5", "SSIM f5"), ("ssim_f10", "SSIM f10"),
                       ("ssim_binarized", "SSIM bin"), ("lpips_alex", "LPIPS-alex"), ("lpips_vgg", "LPIPS-vgg"),
                       ("digit_acc", "digit acc"), ("digit_f10", "digit f10")])
    write_json(args.out, {"model": args.model, "val_clips": args.val_clips, "samples": args.samples,
                          "precision": precision, "requested_precision": args.precision, "rows": rows,
                          **environment(torch.device("cpu"))})


if __name__ == "__main__":
    main()
