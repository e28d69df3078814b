"""What an evaluation writes: the summary table, metrics.json, the per-clip CSV, the metric curves, the prediction
GIF, the self-contained HTML report, and the model card's evaluation section. ``comparison_gif`` is also
training's sample GIF writer."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.utils import export_to_gif

from .hub import read_training_info, write_model_card
from .metrics import DIGIT_ACC, METRICS
from .protocols import MCVD_COLUMNS, OPENSTL_COLUMNS, PROTOCOL_TITLES, format_cell
from .runtime import versions

GROUND_TRUTH = "ground truth"  # the sanity row, and the first column of the GIFs
# Removed when a new evaluation starts, so that an earlier run's outputs never sit beside an interrupted one
# looking current. metrics.json is written last.
OUTPUT_FILES = ("summary.md", "per_clip.csv", "curves.png", "predictions.gif", "generated.gif", "report.html",
                "metrics.json")
SUMMARY_COLUMNS = [("mse", "MSE", 4), ("psnr", "PSNR", 2), ("ssim", "SSIM", 3), ("ssim_binarized", "SSIM bin", 3),
                   ("lpips_alex", "LPIPS-alex", 3), ("lpips_vgg", "LPIPS-vgg", 3)]
DIGIT_COLUMN = (DIGIT_ACC, "digit acc", 3)  # where the test set records the digits' positions
TIMING_HEADER = ["row", "steps", "s/video (batch 1)", "s/video (amortized)"]


def _has_digit_identity(record: dict) -> bool:
    return any(DIGIT_ACC in row["metrics"] for row in record["rows"].values())


def _aggregates(row: dict) -> tuple[str, ...]:
    return ("mean_of_k",) if row["samples_per_clip"] == 1 else ("mean_of_k", "best_of_k")


def clear_outputs(out: Path) -> None:
    """Removes the outputs of an earlier evaluation from ``out`` (its cache stays)."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)


def make_record(config, model_config: dict, test_info: dict, device: str, shipped: str | None, fvd: dict | None,
                rows: dict, **extra) -> dict:
    """What metrics.json holds: the evaluation's config (an ``EvalConfig``), the model's, the test set, the device,
    where the numbers come from (versions, git commit, command line), the rows, then ``extra``."""
    home = str(Path.home())  # the test set's cache folder is written relative to it: results are shared
    return {"model": str(config.model), "model_config": model_config, "eval_config": dataclasses.asdict(config),
            "test_set": {k: "~" + v[len(home):] if k == "path" and v.startswith(home + os.sep) else v
                         for k, v in test_info.items()},
            "data_source": test_info["data_source"], "device": device, "versions": versions(),
            "git_commit": _git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "shipped_sampler": shipped, "fvd": fvd, "rows": rows, **extra}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def row_cells(record: dict, label: str, row: dict) -> list[str]:
    """A table line's first cells (``TIMING_HEADER``): the label, marked when it is the shipped sampler, the steps,
    the batch-1 median with its spread (flagged busy when another process held the cores), the amortized time."""
    timing = row["timing"]
    seconds = lambda name: "" if timing.get(name) is None else f"{timing[name]:.4g}"  # noqa: E731
    latency = seconds("seconds_per_video_batch1")
    if latency and "batch1_spread" in timing:
        latency += f" (±{timing['batch1_spread'] * 50:.0f}%)" + (" busy" if timing.get("batch1_contended") else "")
    return [f"{label} (shipped)" if label == record.get("shipped_sampler") else label, str(row.get("steps", "")),
            latency, seconds("seconds_per_video_amortized")]


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(cells) + " |" for cells in lines)])


def protocol_notes(record: dict) -> list[str]:
    """Sentences that say where the timings were measured and what the task, the stretched rows, the FVD column
    and digit identity are, where a record has them."""
    notes, machine, cfg = [], record.get("machine"), record["model_config"]
    if machine:
        contended = any(row["timing"].get("batch1_contended") for row in record["rows"].values())
        busy = ("; rows marked busy had calls apart by more than 25%: another process shared the cores, so their "
                "latency is not this machine's") if contended else ""
        notes.append(f"Timings: {machine['cpu']} (native bf16: {'yes' if machine['cpu_native_bf16'] else 'no'}), "
                     f"{machine['threads']} threads on {machine['cores']} cores, load average "
                     f"{machine['load_average'][0]:.2f} at the start; batch 1 is the median of 5 calls after a warm-up "
                     f"(± half their range){busy}.")
    if record["eval_config"].get("task") == "interpolate":
        notes.append(f"Interpolation: the model sees {cfg['num_past_frames']} past frames and the "
                     f"{cfg['num_future_frames']} frames after a gap of {cfg['num_current_frames']}, and fills the gap; "
                     "'frame i' counts the gap's frames. Linear cross-fade: the last past frame blended into the first "
                     "frame after the gap.")
    if record["eval_config"].get("stretch"):
        notes.append("Rows marked '+ stretch' score the same predictions after the reproduction's contrast stretch, "
                     "(x - 0.2) / 0.6 clipped to [0, 1], which turns grey pixels black or white and so raises SSIM "
                     "without predicting anything better; the rows without it are the honest numbers.")
    fvd = record.get("fvd")
    if fvd:
        videos = "past + predicted" if fvd["include_past"] else "predicted"
        notes.append(f"FVD (lower is better): I3D Kinetics-400 logits of {videos} frames at {fvd['frame_size']} px, "
                     "all k x N samples as one set against the N real videos (MCVD's table also gives the mean of one "
                     f"FVD per sample trajectory); I3D weights {fvd['weights']}.")
    digits = record.get("digit_identity") or {}
    if _has_digit_identity(record):
        accuracy = digits.get("classifier_mnist_test_accuracy")
        notes.append("Digit acc (higher is better): a small MNIST classifier"
                     + (f" ({accuracy:.2%} on MNIST test digits)" if accuracy is not None else "")
                     + " reads the 28x28 window at each digit's true position in every predicted frame; the fraction "
                     "of digits it reads as the right one. Digits whose window overlaps another digit's by more than "
                     f"{digits.get('max_overlap', 0.5):.0%} of its area are left out of that frame. The ground-truth "
                     "row is the classifier's own ceiling on these clips.")
    elif digits.get("skipped"):
        notes.append(f"Digit identity: skipped, {digits['skipped']}.")
    return notes


def summary_table(record: dict) -> str:
    """The markdown table: one line per row and aggregation (mean-of-k, best-of-k), mean ± 95% interval."""
    with_fvd = record.get("fvd") is not None
    columns = [*SUMMARY_COLUMNS, *([DIGIT_COLUMN] if _has_digit_identity(record) else [])]
    lines = []
    for label, row in record["rows"].items():
        for aggregate in _aggregates(row):
            cells = [*row_cells(record, label, row), str(row["samples_per_clip"]), aggregate.replace("_", "-")]
            for metric, _, digits in columns:
                stats = row["metrics"][metric][aggregate]
                cells.append("n/a" if stats["mean"] is None  # no clip had a value (digit identity: no readable digit)
                             else f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f}")
            if with_fvd:  # a set-level number: one per row, on the mean-of-k line
                fvd = row.get("fvd") if aggregate == "mean_of_k" else None
                cells.append("" if fvd is None else f"{fvd:.1f}")
            lines.append(cells)
    header = [*TIMING_HEADER, "k", "aggregate", *[title for _, title, _ in columns], *(["FVD"] if with_fvd else [])]
    return markdown_table(header, lines)


def protocol_tables(record: dict) -> list[tuple[str, str]]:
    """(title, markdown table) for each of the field's protocols the record holds (MCVD's, OpenSTL's): a line per
    sampler and baseline (the ground truth, a perfect score, is left out)."""
    tables = []
    k = record["eval_config"]["samples_per_clip"]
    for protocol, columns in (("mcvd", MCVD_COLUMNS), ("openstl", OPENSTL_COLUMNS)):
        rows = {label: row["protocols"][protocol] for label, row in record["rows"].items()
                if protocol in row.get("protocols", {}) and label != GROUND_TRUTH}
        if not rows:
            continue
        shown = [c for c in columns if any(c[0] in scores for scores in rows.values())]
        lines = [[label, *[format_cell(scores.get(name), digits) for name, _, digits in shown]]
                 for label, scores in rows.items()]
        tables.append((PROTOCOL_TITLES[protocol].format(k=k), markdown_table(["row", *[t for _, t, _ in shown]],
                                                                              lines)))
    return tables


def evaluation_results(record: dict) -> list[dict]:
    """Every number of the summary table, unrounded: {row, metric, aggregate, value, ci95} per row, metric
    and aggregate, and FVD, a number per row (aggregate None). The model card's metadata takes the shipped
    sampler's numbers from here."""
    results = []
    for label, row in record["rows"].items():
        for metric, stats in row["metrics"].items():
            results += [{"row": label, "metric": metric, "aggregate": name, "value": float(stats[name]["mean"]),
                         "ci95": float(stats[name]["ci95"])}
                        for name in _aggregates(row) if stats[name]["mean"] is not None]
        for metric in ("fvd", "fvd_traj_mean"):
            if row.get(metric) is not None:
                results.append({"row": label, "metric": metric, "aggregate": None, "value": float(row[metric]),
                                "ci95": None})
    return results


def update_model_card(folder: Path, record: dict) -> Path:
    """Adds this evaluation to the model card of a pipeline exported by our training: its table in the text, its
    numbers for the card's metadata. Interpolation gets a section of its own; prediction is the main evaluation."""
    if record["eval_config"].get("task") == "interpolate":
        return record_task_evaluation(folder, "interpolate", record, summary_table(record))
    info = read_training_info(folder)
    info["evaluation"] = {"command": record["command"], "num_clips": record["eval_config"]["num_clips"],
                          "samples_per_clip": record["eval_config"]["samples_per_clip"],
                          "data_source": record["data_source"], "device": device_text(record),
                          "test_set": record["test_set"]["name"], "shipped_sampler": record.get("shipped_sampler"),
                          "fvd": record.get("fvd"), "table": summary_table(record),
                          "protocol_tables": protocol_tables(record),
                          "results": evaluation_results(record)}
    return write_model_card(folder, info)


def device_text(record: dict) -> str:
    """The device an evaluation ran on, with whether its CPU runs bf16 natively (timings depend on both)."""
    machine = record.get("machine")
    return record["device"] + (f", native bf16: {'yes' if machine['cpu_native_bf16'] else 'no'}" if machine else "")


def record_task_evaluation(folder: Path, task: str, record: dict, table: str) -> Path:
    """Adds the evaluation of another task than prediction (interpolate, generate) to the model card."""
    info = read_training_info(folder)
    cfg = record["eval_config"]
    info.setdefault("task_evaluations", {})[task] = {
        "command": record["command"], "num_clips": cfg["num_clips"], "device": device_text(record),
        "samples_per_clip": None if task == "generate" else cfg["samples_per_clip"], "table": table}
    return write_model_card(folder, info)


def write_metrics_json(out: Path, record: dict) -> None:
    """metrics.json, written last and whole: its presence says the evaluation finished."""
    tmp = out / ".metrics.json.partial"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, out / "metrics.json")


def write_outputs(out: Path, record: dict, past: torch.Tensor, future: torch.Tensor, gifs: dict) -> None:
    json_record = json.loads(json.dumps(record, default=str))
    for row in json_record["rows"].values():  # per-clip values live in per_clip.csv
        for stats in row["metrics"].values():
            stats.pop("per_clip_mean_of_k"), stats.pop("per_clip_best_of_k")
    _write_per_clip_csv(out / "per_clip.csv", record)
    table = summary_table(record)
    (out / "summary.md").write_text(
        f"# Evaluation of {record['model']}\n\n"
        f"{record['eval_config']['num_clips']} clips of the {record['test_set']['name']} test set "
        f"({record['data_source']}), {record['eval_config']['samples_per_clip']} samples per clip, device "
        f"{record['device']}. Values: mean over clips ± 95% interval; per frame, then mean-of-k or best-of-k "
        f"per clip. PSNR capped at 100 dB.\n\n{table}\n" + "".join(f"\n{note}\n" for note in protocol_notes(record))
        + "".join(f"\n## {title}\n\n{other}\n" for title, other in protocol_tables(record)))
    plot_curves(out / "curves.png", record)
    if len(past) and gifs:
        predictions = {f"{spec} #{s + 1}": gif[:, s].float() / 255 for spec, gif in gifs.items()
                       for s in range(gif.shape[1])}
        comparison_gif(out / "predictions.gif", past, future, predictions)
    write_report(out / "report.html", record, table, out / "curves.png",
                 out / "predictions.gif" if (out / "predictions.gif").exists() else None)
    write_metrics_json(out, json_record)


def _write_per_clip_csv(path: Path, record: dict) -> None:
    columns = [(m, a) for m in (*METRICS, *([DIGIT_ACC] if _has_digit_identity(record) else []))
               for a in ("mean_of_k", "best_of_k")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "clip", *[f"{m}_{a}" for m, a in columns]])
        for label, row in record["rows"].items():
            for clip in range(len(row["metrics"]["mse"]["per_clip_mean_of_k"])):
                values = [row["metrics"][m][f"per_clip_{a}"][clip] for m, a in columns]
                writer.writerow([label, clip, *["" if v is None else f"{v:.6g}" for v in values]])


def plot_curves(path: Path, record: dict) -> None:
    """SSIM, PSNR and LPIPS (and digit identity, where scored) against the predicted frame's index, one line
    per sampler and baseline."""
    from matplotlib.figure import Figure

    panels = [("ssim", "SSIM"), ("psnr", "PSNR (dB)"), ("lpips_alex", "LPIPS (AlexNet)"), ("lpips_vgg", "LPIPS (VGG)")]
    if _has_digit_identity(record):
        panels.append((DIGIT_ACC, "digit accuracy"))
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels))
    # one color per row in every panel; the ground truth (drawn only where it is not a perfect score) in black
    colors = {label: f"C{i}" for i, label in enumerate(label for label in record["rows"] if label != GROUND_TRUTH)}
    colors[GROUND_TRUTH] = "black"
    for ax, (metric, title) in zip(axes, panels):
        for label, row in record["rows"].items():
            if label == GROUND_TRUTH and metric != DIGIT_ACC:
                continue  # a flat line at the perfect score (digit identity's is the classifier's ceiling)
            curve = [float("nan") if v is None else v for v in row["metrics"][metric]["per_frame"]]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, color=colors[label],
                    linestyle="--" if row["kind"] == "baseline" else "-", label=label)
        if metric == DIGIT_ACC or ax is axes[0]:
            ax.legend(fontsize=8)
        ax.set_xlabel("predicted frame")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle("per-frame metrics (mean over clips and samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _tile(frame: torch.Tensor, scale: int, border: tuple[int, int, int]) -> np.ndarray:
    """A (1, H, W) frame in [0, 1] -> an RGB tile with a 2-pixel colored border."""
    grey = (frame[0].clamp(0, 1) * 255).round().byte().numpy()
    grey = grey.repeat(scale, 0).repeat(scale, 1)
    tile = np.empty((grey.shape[0] + 4, grey.shape[1] + 4, 3), dtype=np.uint8)
    tile[:] = border
    tile[2:-2, 2:-2] = grey[..., None]
    return tile


def comparison_gif(path: str | os.PathLike, past: torch.Tensor, target: torch.Tensor,
                   predictions: dict[str, torch.Tensor], scale: int = 2, fps: int = 4) -> Path:
    """A GIF grid: one row per clip, columns ground truth then each prediction. The past frames play first in
    every column (green border), then the future (white border for ground truth, red for predictions)."""
    columns, num_past = {GROUND_TRUTH: target, **predictions}, past.shape[1]
    borders = {label: (255, 255, 255) if label == GROUND_TRUTH else (220, 50, 50) for label in columns}
    tile_width = past.shape[-1] * scale + 4
    frames = []
    for t in range(num_past + target.shape[1]):
        rows = []
        for b in range(past.shape[0]):  # one row per clip: every column shows the same past frame first
            tiles = [_tile(past[b, t], scale, (40, 200, 70)) if t < num_past
                     else _tile(video[b, t - num_past], scale, borders[label]) for label, video in columns.items()]
            rows.append(np.concatenate(tiles, axis=1))
        grid = np.concatenate(rows, axis=0)
        image = PIL.Image.new("RGB", (grid.shape[1], grid.shape[0] + 28))
        draw = PIL.ImageDraw.Draw(image)
        for i, label in enumerate(columns):
            name, _, sample = label.partition(" #")
            draw.text((i * tile_width + 3, 1), name, fill=(255, 255, 255))
            draw.text((i * tile_width + 3, 13), f"sample {sample}" if sample else "", fill=(200, 200, 200))
        # counted from 1 like the tables and curves: past 1..P, then predicted frames 1..F
        caption = f"past {t + 1}" if t < num_past else f"frame {t - num_past + 1}"
        draw.text((grid.shape[1] - 58, 13), caption, fill=(160, 160, 160))
        image.paste(PIL.Image.fromarray(grid), (0, 28))
        frames.append(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_gif(frames, str(path), fps=fps)
    return path


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _markdown_table_to_html(table: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in table.splitlines()]
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731
    return ("<table><thead><tr>" + cells(lines[0], "th") + "</tr></thead><tbody>"
            + "".join("<tr>" + cells(row, "td") + "</tr>" for row in lines[2:]) + "</tbody></table>")


def write_report(path: Path, record: dict, table: str, curves: Path, gif: Path | None) -> None:
    """One self-contained HTML page: the table, the curves and the GIF, images inlined."""
    cfg = record["eval_config"]
    details = {"model": record["model"], "test set": f"{record['test_set']['name']}: {record['data_source']}",
               "clips": cfg["num_clips"], "samples per clip": cfg["samples_per_clip"],
               "frames predicted": cfg["num_frames"], "device": record["device"],
               "versions": ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v),
               "git commit": record["git_commit"] or "unknown"}
    gif_html = (f'<h2>Predictions</h2><p>Rows: clips. Columns: ground truth, then samples of each sampler. '
                f'Green border: past frames; red: predicted.</p><img alt="predictions" src="{_data_uri(gif, "image/gif")}">'
                if gif else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MCVD evaluation: {html.escape(record['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
</style></head><body>
<h1>MCVD evaluation</h1>
<ul>{"".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in details.items())}</ul>
<h2>Results</h2>
<p>Mean over clips ± 95% interval. Per clip: metrics averaged over the predicted frames, then over the
k samples (mean-of-k) or the best sample (best-of-k). No post-processing of predictions (except in rows
marked '+ stretch').</p>
{_markdown_table_to_html(table)}
{"".join(f"<p>{html.escape(note)}</p>" for note in protocol_notes(record))}
{"".join(f"<h2>{html.escape(title)}</h2>{_markdown_table_to_html(other)}" for title, other in protocol_tables(record))}
<h2>Per-frame metrics</h2>
<img alt="per-frame metric curves" src="{_data_uri(curves, 'image/png')}">
{gif_html}
</body></html>
"""
    path.write_text(page)
