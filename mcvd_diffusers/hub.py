"""The model card of an exported pipeline (its README.md, rendered from its training_info.json and the Jinja template
pipeline_card.md, with the Hub's metadata as YAML front matter), and the upload to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.meta
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .pipeline_mcvd import check_pipeline_folder
from .runtime import describe_precision

CARD_TEMPLATE = Path(__file__).with_name("pipeline_card.md")  # a link to the repository's pipeline_card.md
INFO_FILE = "training_info.json"

# The card's metadata. custom_code: an export carries its code (trust_remote_code). The dataset is MNIST: clips are
# rendered from its digits on the fly (the Hub holds no canonical Moving MNIST). image-to-video: the Hub's nearest task.
TAGS = ["video-prediction", "mcvd", "moving-mnist", "diffusers", "custom_code"]
DATASETS = ["ylecun/mnist"]
PIPELINE_TAG = "image-to-video"
# The evaluation numbers in the card's model-index: the shipped sampler's, mean of the k samples per clip.
CARD_METRICS = {"mse": "MSE", "ssim": "SSIM", "ssim_binarized": "binarized SSIM", "lpips_alex": "LPIPS-alex",
                "lpips_vgg": "LPIPS-vgg", "fvd": "FVD"}
TEST_SETS = {"generated": "generated from MNIST test digits", "official": "mnist_test_seq.npy, Srivastava et al. 2015"}


class HubUploadError(RuntimeError):
    """An upload to the Hub failed (network, authentication, permissions); the local export is kept."""


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _duration(seconds) -> str:
    if seconds is None:
        return "an unrecorded amount"
    minutes = seconds / 60
    return f"{minutes:.1f} minutes" if minutes < 120 else f"{minutes / 60:.2f} hours"


def _eval_results(evaluation: dict) -> list[EvalResult]:
    """The shipped sampler's numbers (mean of k samples per clip; FVD when measured) as the Hub's model-index
    entries; none without the shipped sampler's row, or from before evaluations kept their numbers (``results``)."""
    shipped, k = evaluation.get("shipped_sampler"), evaluation.get("samples_per_clip")
    test_set = evaluation.get("test_set")
    values = {r["metric"]: r["value"] for r in evaluation.get("results") or []
              if r["row"] == shipped and r["aggregate"] in ("mean_of_k", None)}
    clips = f"{evaluation.get('num_clips')} test clips ({TEST_SETS.get(test_set, test_set)})"
    return [EvalResult(task_type="video-prediction", task_name="Video Prediction", dataset_type="moving-mnist",
                       dataset_name=f"Moving MNIST, {clips}", dataset_config=test_set, dataset_split="test",
                       metric_type=metric, metric_value=values[metric],
                       metric_name=f"{title} ({shipped})" if metric == "fvd" else
                       f"{title} ({shipped}, mean of {k} samples per clip)")
            for metric, title in CARD_METRICS.items() if metric in values]


def card_metadata(info: dict, model_name: str) -> ModelCardData:
    """The card's YAML front matter: library, license, tags, training data, task, and the model-index of the
    evaluation that eval_mcvd.py --update_model_card recorded, if any."""
    results = _eval_results(info.get("evaluation") or {})
    return ModelCardData(library_name="diffusers", license="mit", tags=TAGS, datasets=DATASETS,
                         pipeline_tag=PIPELINE_TAG, model_name=model_name if results else None,
                         eval_results=results or None)


def render_model_card(info: dict, repo_id: str) -> str:
    """The card's text for a pipeline trained as ``info`` records; ``repo_id`` goes into the usage snippet."""
    config, abilities, usage = info["config"], [], ""
    if config["prob_mask_past"] > 0:
        abilities.append("it also generates without past frames (`past_frames=None`)")
        usage += ("\nvideo = pipe(batch_size=4, num_frames=10, num_inference_steps=20).frames  # unconditional "
                  "generation\n# (from nothing, digits need more steps per block than prediction does)\n")
    if config["num_future_frames"] > 0:
        abilities.append(f"it interpolates between the past and {config['num_future_frames']} future frames "
                         "(`future_frames=`)")
        usage += (f"after = torch.rand(1, {config['num_future_frames']}, {config['image_size']}, "
                  f"{config['image_size']})  # the frames after the gap\n"
                  f"gap = pipe(past, future_frames=after, num_frames={config['num_current_frames']}).frames  "
                  "# interpolation\n")
    evaluation = info.get("evaluation")
    if evaluation:
        metrics = (f"`{evaluation['command']}` on {evaluation['num_clips']} test clips ({evaluation['data_source']}), "
                   f"{evaluation['samples_per_clip']} samples per clip, device {evaluation['device']}:\n\n"
                   f"{evaluation['table']}")
        for title, table in evaluation.get("protocol_tables") or []:  # the field's protocols, the same samples
            metrics += f"\n\n{title}:\n\n{table}"
    else:
        metrics = ("Not evaluated yet. Run `python eval_mcvd.py --model PATH --out results/NAME --update_model_card` "
                   "to add the table here.")
    titles = {"interpolate": "Interpolation (the frames between the past and the future frames)",
              "generate": "Unconditional generation (no frames in; real clips and noise for reference)"}
    evaluations = info.get("task_evaluations") or {}
    for task, done in ((task, evaluations[task]) for task in titles if task in evaluations):
        per_clip = f", {done['samples_per_clip']} samples per clip" if done.get("samples_per_clip") else ""
        metrics += (f"\n\n### {titles.get(task, task)}\n\n`{done['command']}` on {done['num_clips']} "
                    f"{'videos' if task == 'generate' else 'test clips'}{per_clip}, device {done['device']}:\n\n"
                    f"{done['table']}")
    # "precision: bf16 (auto: this CPU has native bf16: <model>)"; no line for runs from before mixed_precision auto
    recorded = info.get("precision")
    known = isinstance(recorded, dict) and {"resolved", "reason"} <= recorded.keys()
    precision = describe_precision(recorded) if known else ""
    # a local export's name: its folder's, or the run's for the run's own pipeline/ and best/ folders
    local_name = Path(config["output_dir"] if Path(repo_id).name in ("pipeline", "best") else repo_id).name
    values = {
        "model_name": config.get("hub_model_id") or local_name,
        "repo_id": repo_id,
        **{key: config[key] for key in ("num_past_frames", "num_current_frames", "image_size")},
        "capabilities": ("; " + "; ".join(abilities)) if abilities else "",
        **{key: info[key] for key in ("scheduler", "num_inference_steps", "data_source", "steps", "num_processes",
                                      "samples_seen", "weights_step")},
        "final_loss": _number(info["final_loss"]),
        "val_loss": _number(info["val_loss"]),
        "train_time": _duration(info.get("train_seconds")),
        "commands": "; ".join(f"`{c}`" for c in info.get("commands") or []) or "not recorded (the Python API)",
        "precision": precision,
        "config": yaml.safe_dump(config, sort_keys=False).strip(),
        "metrics": metrics,
        "task_usage": usage,
        "notes": f"\n{info['notes']}\n" if info.get("notes") else "",
    }
    metadata = card_metadata(info, values["model_name"])
    # ModelCard.from_template renders a placeholder nobody fills as nothing (it takes no ``undefined=``): an error
    # here. It also passes the metadata's own keys and card_data (the YAML front matter) to the template.
    template = jinja2.Environment().parse(CARD_TEMPLATE.read_text())
    missing = jinja2.meta.find_undeclared_variables(template) - {"card_data", *metadata.to_dict(), *values}
    if missing:
        raise ValueError(f"{CARD_TEMPLATE} uses placeholders nobody fills: {sorted(missing)}")
    text = str(ModelCard.from_template(metadata, template_path=str(CARD_TEMPLATE), **values))
    return text if text.endswith("\n") else text + "\n"  # Jinja drops the template's final newline


def read_training_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {INFO_FILE}: it was not exported by mcvd_diffusers' training")
    return json.loads(path.read_text())


def write_model_card(folder: str | Path, info: dict, repo_id: str | None = None) -> Path:
    """Writes ``training_info.json`` and the ``README.md`` rendered from it into a pipeline folder.
    ``repo_id`` (the name in the usage snippet) defaults to the one recorded, else the folder's path."""
    folder = Path(folder)
    info = {**info, "repo_id": repo_id or info.get("repo_id") or str(folder)}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
    card = folder / "README.md"
    card.write_text(render_model_card(info, info["repo_id"]))
    return card


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Uploads an exported pipeline folder (weights, configs, card) to a Hub model repo; returns its URL."""
    folder = Path(folder)
    check_pipeline_folder(folder)
    write_model_card(folder, read_training_info(folder), repo_id)  # the usage snippet names the repo
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload MCVDPipeline (mcvd-diffusers)")
    except Exception as e:  # network, auth and permission errors all come here; the export stays on disk
        raise HubUploadError(f"uploading {folder} to the Hub repo {repo_id} failed ({type(e).__name__}: {e}). "
                           f"The export is kept; push it again with: python train_mcvd.py --push {folder} "
                           f"--hub_model_id {repo_id}") from e
    return str(url)
