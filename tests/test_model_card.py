"""The model card's metadata (huggingface_hub's ModelCard): what the Hub reads, and the evaluation numbers in it."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from mcvd_diffusers import hub
from mcvd_diffusers.evaluation import EvalConfig
from mcvd_diffusers.hub import read_training_info, render_model_card, write_model_card
from mcvd_diffusers.metrics import METRICS, aggregate
from mcvd_diffusers.report import evaluation_results, make_record, summary_table, update_model_card

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "mmnist-5to10"
CARD_METRICS = {"mse", "ssim", "ssim_binarized", "lpips_alex", "lpips_vgg"}


@pytest.fixture
def folder(tmp_path):
    """A pipeline folder's training record (the shipped model's, without its evaluation): all the card needs."""
    info = read_training_info(SHIPPED)
    info.pop("evaluation"), info.pop("repo_id")  # the card then names the folder
    (tmp_path / "training_info.json").write_text(json.dumps(info))
    return tmp_path


def fake_record(rows: dict[str, int], shipped: str | None = "ddim:20", fvd: bool = True) -> dict:
    """An evaluation record as evaluate() makes it, with made-up numbers: {row label: k samples per clip}."""
    torch.manual_seed(0)
    record_rows = {}
    for label, k in rows.items():
        per_frame = {name: torch.rand(3, k, 4) for name in METRICS}
        record_rows[label] = {"kind": "sampler" if ":" in label else "baseline", "steps": 20, "samples_per_clip": k,
                              "timing": {"seconds_per_video_amortized": 0.5}, "metrics": aggregate(per_frame),
                              **({"fvd": float(torch.rand(1) * 100)} if fvd else {})}
    fvd_info = {"weights": "random", "include_past": True, "pooling": "all", "frame_size": 32} if fvd else None
    test_set = {"name": "generated", "data_source": "bundled MNIST sample"}
    config = EvalConfig(model="m", out="o", num_clips=3, samples_per_clip=2)
    return make_record(config, {}, test_set, "cpu", shipped, fvd_info, record_rows)


def test_card_metadata_without_an_evaluation(folder):
    info = read_training_info(folder)
    info["config"]["hub_model_id"] = "someone/mcvd"
    card_text = write_model_card(folder, info, "someone/mcvd").read_text()
    data = ModelCard(card_text).data
    assert data.library_name == "diffusers" and data.license == "mit"
    assert data.tags == ["video-prediction", "mcvd", "moving-mnist", "diffusers", "custom_code"]
    assert data.datasets == ["ylecun/mnist"] and data.pipeline_tag == "image-to-video"
    assert data.base_model is None and data.eval_results is None and "model-index" not in card_text
    assert card_text.startswith("---\n") and "{{" not in card_text and card_text.endswith("\n")
    assert "# someone/mcvd\n" in card_text and 'MCVDPipeline.from_pretrained("someone/mcvd")' in card_text
    assert "Not evaluated yet" in card_text and "learning_rate: " in card_text


def test_an_evaluation_puts_the_shipped_samplers_numbers_in_the_model_index(folder):
    record = fake_record({"ground truth": 1, "copy last frame": 1, "ddim:20": 2, "ddim:50": 2})
    card_text = update_model_card(folder, record).read_text()
    evaluation = read_training_info(folder)["evaluation"]
    assert evaluation["results"] == evaluation_results(record) and evaluation["table"] == summary_table(record)
    assert summary_table(record) in card_text and "Not evaluated yet" not in card_text

    data = ModelCard(card_text).data
    assert data.model_name == folder.name and data.library_name == "diffusers"
    shipped = record["rows"]["ddim:20"]
    expected = {m: shipped["metrics"][m]["mean_of_k"]["mean"] for m in CARD_METRICS} | {"fvd": shipped["fvd"]}
    assert {r.metric_type: r.metric_value for r in data.eval_results} == expected  # exact: YAML keeps every digit
    assert len(data.eval_results) == len(expected)
    for result in data.eval_results:
        assert result.task_type == "video-prediction" and result.dataset_type == "moving-mnist"
        assert result.dataset_config == "generated" and result.dataset_split == "test"
        assert "ddim:20" in result.metric_name
    # the stored numbers are every row's, unrounded, mean-of-k and best-of-k (best-of-k only where k > 1)
    stored = {(r["row"], r["metric"], r["aggregate"]): r["value"] for r in evaluation["results"]}
    assert stored[("ddim:50", "lpips_vgg", "best_of_k")] == record["rows"]["ddim:50"]["metrics"]["lpips_vgg"][
        "best_of_k"]["mean"]
    assert ("copy last frame", "mse", "best_of_k") not in stored and ("ddim:50", "fvd", None) in stored


@pytest.mark.parametrize("shipped, rows, fvd", [
    (None, {"ddim:50": 2}, True),  # a scheduler of its own: no sampler row is the model as shipped
    ("ddim:20", {"ddim:50": 2, "ddim:20 + stretch": 2}, True),  # the shipped sampler was not evaluated
])
def test_no_model_index_without_the_shipped_samplers_row(folder, shipped, rows, fvd):
    card_text = update_model_card(folder, fake_record(rows, shipped, fvd)).read_text()
    assert ModelCard(card_text).data.eval_results is None and "model-index" not in card_text
    assert "| ddim:50 | 20 |" in card_text  # the table is still there


def test_without_fvd_the_model_index_has_the_five_metrics(folder):
    card_text = update_model_card(folder, fake_record({"ddim:20": 1}, fvd=False)).read_text()
    assert {r.metric_type for r in ModelCard(card_text).data.eval_results} == CARD_METRICS


def test_a_placeholder_nobody_fills_is_an_error(folder, tmp_path, monkeypatch):
    template = tmp_path / "card.md"
    monkeypatch.setattr(hub, "CARD_TEMPLATE", template)
    info = read_training_info(folder)
    template.write_text("---\n{{ card_data }}\n---\n\n# {{ repo_id }} ({{ license }})\n")
    assert ModelCard(render_model_card(info, "someone/mcvd")).text == "\n# someone/mcvd (mit)\n"
    for typo in ("{{ modle_name }}", "{% if nobody_sets_this %}x{% endif %}"):
        template.write_text((REPO / "pipeline_card.md").read_text() + typo)
        with pytest.raises(ValueError, match=r"placeholders nobody fills: \['(modle_name|nobody_sets_this)'\]"):
            render_model_card(info, "someone/mcvd")


def test_the_shipped_card_is_rendered_from_its_training_info_with_the_reference_numbers(tmp_path):
    info = read_training_info(SHIPPED)
    assert (SHIPPED / "README.md").read_text() == render_model_card(info, info["repo_id"])  # not edited by hand
    reference = json.loads((REPO / "results" / "reference" / "metrics.json").read_text())
    row = reference["rows"][reference["shipped_sampler"]]
    data = ModelCard((SHIPPED / "README.md").read_text()).data
    expected = {m: row["metrics"][m]["mean_of_k"]["mean"] for m in CARD_METRICS}
    assert row["fvd"] is not None  # the reference evaluation measured FVD with the real I3D
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {**expected, "fvd": row["fvd"]}
    # an evaluation recorded before the numbers were kept: the table, no model-index
    shutil.copy(SHIPPED / "training_info.json", tmp_path)
    old = {**info, "evaluation": {k: v for k, v in info["evaluation"].items() if k != "results"}}
    card_text = write_model_card(tmp_path, old).read_text()
    assert ModelCard(card_text).data.eval_results is None and info["evaluation"]["table"] in card_text


def test_the_general_models_card_shows_each_task_it_was_evaluated_on():
    general = REPO / "checkpoints" / "mmnist-general"
    info = read_training_info(general)
    card = (general / "README.md").read_text()
    assert card == render_model_card(info, info["repo_id"])  # not edited by hand
    for task, folder in (("interpolate", "interpolate"), ("generate", "generate")):
        assert info["task_evaluations"][task]["table"] in card
        assert f"results/general/{folder}" in info["task_evaluations"][task]["command"]
    assert "### Interpolation" in card and "### Unconditional generation" in card
    assert "future_frames=after" in card and "pipe(batch_size=4" in card  # usage for the two extra tasks
    assert info["notes"] in card  # how it compares with the prediction model
    reference = json.loads((REPO / "results" / "general" / "predict" / "metrics.json").read_text())
    shipped = reference["rows"][reference["shipped_sampler"]]["metrics"]
    data = ModelCard(card).data  # the prediction numbers are the card's model-index
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {m: shipped[m]["mean_of_k"]["mean"]
                                                                          for m in CARD_METRICS}


def test_the_card_names_whether_the_evaluations_cpu_runs_bf16_natively():
    from mcvd_diffusers.report import device_text

    record = {"device": "CPU (Some CPU, x86_64, 2 threads)"}
    assert device_text(record) == record["device"]  # recorded before machine_state existed: as it was
    assert device_text({**record, "machine": {"cpu_native_bf16": False}}).endswith("2 threads), native bf16: no")
    assert device_text({**record, "machine": {"cpu_native_bf16": True}}).endswith("native bf16: yes")
