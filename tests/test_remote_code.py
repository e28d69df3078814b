"""An export with remote code (mcvd_diffusers.remote_code) loads with plain diffusers and trust_remote_code=True,
from a local folder and from the Hub, in a process that cannot import mcvd_diffusers, and gives the frames the
package gives; MCVDPipeline.from_pretrained keeps loading it with the package's classes."""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline

import mcvd_diffusers
from mcvd_diffusers import MCVDPipeline, MCVDUNet2DModel, make_sampler
from mcvd_diffusers.remote_code import add_remote_code

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(mcvd_diffusers.__file__).resolve().parent
REMOTE_FILES = ["pipeline_mcvd.py", "integrity.py", "unet/unet_mcvd.py"]
HUB_REPO, HUB_COMMIT = "someone/mcvd-tiny", "0123456789abcdef0123456789abcdef01234567"
PAST_SEED, NOISE_SEED, STEPS = 5, 0, 2

# Runs in a fresh interpreter (python -I: no PYTHONPATH, no working directory on sys.path) where a finder ahead
# of the editable install's refuses mcvd_diffusers: only diffusers and the folder's own code can load the pipeline.
PLAIN_DIFFUSERS = r"""
import importlib.abc, json, sys
from pathlib import Path

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mcvd_diffusers":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

sys.meta_path.insert(0, BlockPackage())
source, out, repo = sys.argv[1:4]
assert not any(p and Path(p).resolve() == Path(repo) for p in sys.path), sys.path
try:
    import mcvd_diffusers
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("mcvd_diffusers is importable")

import numpy as np
import torch
from diffusers import DiffusionPipeline

torch.set_num_threads(2)
try:
    DiffusionPipeline.from_pretrained(source)
except ValueError as e:
    assert "trust_remote_code=True" in str(e), e
else:
    raise SystemExit("loaded without trust_remote_code")
pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
cfg = pipe.unet.config
past = torch.rand(1, cfg.num_past_frames, cfg.sample_size, cfg.sample_size,
                  generator=torch.Generator().manual_seed(%(past_seed)d))
frames = pipe(past, num_inference_steps=%(steps)d, generator=torch.Generator().manual_seed(%(noise_seed)d)).frames
np.save(out, frames.numpy())
module = sys.modules[type(pipe).__module__]
print(json.dumps({
    "pipeline": type(pipe).__module__ + "." + type(pipe).__qualname__,
    "unet": type(pipe.unet).__module__ + "." + type(pipe.unet).__qualname__,
    "unet_is_the_pipelines_class": type(pipe.unet) is module.MCVDUNet2DModel,
    "modules": sorted(m for m in sys.modules if m.startswith("diffusers_modules")),
}))
""" % dict(past_seed=PAST_SEED, noise_seed=NOISE_SEED, steps=STEPS)


def predict(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.unet.config
    past = torch.rand(1, cfg.num_past_frames, cfg.sample_size, cfg.sample_size,
                      generator=torch.Generator().manual_seed(PAST_SEED))
    return pipe(past, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(NOISE_SEED)).frames.numpy()


def export(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder)
    assert add_remote_code(folder) == REMOTE_FILES
    return folder


@pytest.fixture(scope="module")
def tiny():
    pipe = make_tiny_pipeline()
    pipe.scheduler = make_sampler("ddim", pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """An exported folder, and the frames MCVDPipeline.from_pretrained (the package) predicts with it."""
    folder = export(tiny, tmp_path_factory.mktemp("export") / "pipeline")
    frames = predict(MCVDPipeline.from_pretrained(folder))
    np.testing.assert_allclose(frames, predict(tiny), rtol=0, atol=1e-6)
    return folder, frames


def run_plain_diffusers(source: str, tmp_path: Path, **env) -> tuple[dict, np.ndarray, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "PYTHON")) and not k.lower().endswith("_proxy")}
    clean.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="2", **env)
    out = tmp_path / "frames.npy"
    result = subprocess.run([sys.executable, "-I", "-c", PLAIN_DIFFUSERS, source, str(out), str(REPO)],
                            env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out), result.stderr


def test_plain_diffusers_loads_a_local_export_without_the_package(exported, tmp_path):
    folder, expected = exported
    info, frames, log = run_plain_diffusers(str(folder), tmp_path, HF_HUB_OFFLINE="1")
    np.testing.assert_allclose(frames, expected, rtol=0, atol=1e-6)
    assert info["pipeline"] == "diffusers_modules.local.pipeline_mcvd.MCVDPipeline"
    assert info["unet"].endswith(".MCVDUNet2DModel") and info["unet_is_the_pipelines_class"]
    assert "Expected types for unet" not in log  # one UNet class, though diffusers runs its file twice


class FakeHub:
    """The Hub's HTTP API for one model repo at one commit, served from a folder: what huggingface_hub asks for
    (repo info, the recursive tree listing, HEAD/GET of /resolve/ URLs) and nothing more. Logs the requests."""

    def __init__(self, folder: Path, repo_id: str, commit: str):
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body: bytes, headers: dict, status: int = 200):
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                blob = re.fullmatch(rf"/{repo_id}/resolve/[^/]+/(.+)", path)
                if re.fullmatch(rf"/api/models/{repo_id}(/revision/[^/]+)?", path):
                    info = {"id": repo_id, "sha": commit, "private": False,
                            "siblings": [{"rfilename": name} for name in files]}
                    self.reply(json.dumps(info).encode(), {"Content-Type": "application/json"})
                elif re.fullmatch(rf"/api/models/{repo_id}/tree/{commit}", path):
                    tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in files.items()]
                    self.reply(json.dumps(tree).encode(), {"Content-Type": "application/json"})
                elif blob and blob.group(1) in files:
                    data = files[blob.group(1)]
                    self.reply(data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
                else:
                    self.reply(b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"}, status=404)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_plain_diffusers_loads_the_export_from_the_hub(exported, tmp_path):
    """diffusers takes another path for a Hub repo id: DiffusionPipeline.download lists the repo (model_info),
    fetches the pipeline file and the files it imports one by one (hf_hub_download; for the code, a copy under
    diffusers_modules/local/<user>--<repo>/<commit>/), then the snapshot of what model_index.json names
    (snapshot_download with allow-patterns: of unet/, only its weights, config and unet_mcvd.py), and loads
    that snapshot like a local folder. A fake Hub server (HF_ENDPOINT) runs all of it unchanged; a pre-filled
    offline cache would skip it (download() then returns the cached snapshot at once) and would hide a file the
    patterns leave out."""
    folder, expected = exported
    hub = FakeHub(folder, HUB_REPO, HUB_COMMIT)
    try:
        info, frames, _ = run_plain_diffusers(HUB_REPO, tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    finally:
        hub.close()
    np.testing.assert_allclose(frames, expected, rtol=0, atol=1e-6)
    hub_module = f"diffusers_modules.local.{HUB_REPO.replace('/', '--')}.{HUB_COMMIT}.pipeline_mcvd"
    assert hub_module in info["modules"], info["modules"]  # the pipeline code came through the Hub code path
    assert info["unet_is_the_pipelines_class"]
    fetched = {r.split(f"/resolve/{HUB_COMMIT}/")[1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r}
    assert set(REMOTE_FILES) <= fetched, hub.requests
    snapshot = tmp_path / "hf_home" / "hub" / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / HUB_COMMIT
    assert all((snapshot / name).is_file() for name in REMOTE_FILES)


def test_mcvd_pipeline_loads_the_export_with_the_package_classes(exported, tmp_path):
    folder, expected = exported
    before = set(sys.modules)
    pipe = MCVDPipeline.from_pretrained(folder)  # no trust_remote_code: the folder's code does not run
    assert type(pipe) is MCVDPipeline and type(pipe.unet) is MCVDUNet2DModel
    assert not [m for m in set(sys.modules) - before if m.startswith("diffusers_modules")]
    np.testing.assert_array_equal(predict(pipe), expected)
    # Saved again, it is a package export again (as save_pipeline writes before calling add_remote_code).
    pipe.save_pretrained(tmp_path / "again")
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == "MCVDPipeline"
    assert index["unet"] == ["mcvd_diffusers.unet.unet_mcvd", "MCVDUNet2DModel"]


def test_the_export_is_deterministic_and_machine_independent(tiny, exported, tmp_path):
    folder, _ = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_mcvd", "MCVDPipeline"]
    assert index["unet"] == ["unet_mcvd", "MCVDUNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    other = export(tiny, tmp_path / "elsewhere")
    (other / "old_remote_code.py").write_text("# mcvd-diffusers remote code: from an earlier export\n")
    (other / "notes.py").write_text("# the user's own file\n")
    add_remote_code(other)  # a second run on the same folder changes nothing, and drops what it no longer writes
    assert not (other / "old_remote_code.py").exists() and (other / "notes.py").exists()
    for name in REMOTE_FILES + ["model_index.json"]:
        assert (other / name).read_bytes() == (folder / name).read_bytes(), name
    for name in REMOTE_FILES:  # the package's files, unchanged: no path of the exporting machine
        assert (folder / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), name
        text = (folder / name).read_text()
        for path in {str(REPO), str(PACKAGE_DIR), str(folder), str(tmp_path), str(Path.home())}:
            assert path not in text, (name, path)


# The patterns diffusers (utils/dynamic_modules_utils.py) reads a module file's imports with: what it fetches
# beside the file (relative) and what it checks is installed (absolute). They also match text in docstrings.
DIFFUSERS_RELATIVE = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.M), re.compile(r"^\s*from\s+\.(\S+)\s+import", re.M))
DIFFUSERS_ABSOLUTE = (re.compile(r"^\s*import\s+(\S+)\s*$", re.M), re.compile(r"^\s*from\s+(\S+)\s+import", re.M))
LIBRARIES = {"torch", "numpy", "PIL", "diffusers", "huggingface_hub", "safetensors"}


@pytest.mark.parametrize("name, relative", [("pipeline_mcvd.py", {"integrity", "unet.unet_mcvd"}),
                                            ("integrity.py", set()), ("unet/unet_mcvd.py", set())])
def test_the_copied_files_stand_alone(name, relative):
    """What diffusers reads from each file: the relative imports are the other copied files (a component file
    is loaded on its own, so it has none), the rest are the standard library and diffusers' own dependencies."""
    text = (PACKAGE_DIR / name).read_text()
    assert {m for pattern in DIFFUSERS_RELATIVE for m in pattern.findall(text)} == relative
    assert {m.replace(".", "/") + ".py" for m in relative} <= set(REMOTE_FILES)
    roots = {m.split(".")[0] for pattern in DIFFUSERS_ABSOLUTE for m in pattern.findall(text)} - {""}
    assert roots <= LIBRARIES | set(sys.stdlib_module_names), roots - LIBRARIES
    assert "mcvd_diffusers" not in roots


def test_folders_saved_before_the_unet_moved_still_load(tiny, tmp_path):
    for name in ("old", "new"):
        tiny.save_pretrained(tmp_path / name)
    index_path = tmp_path / "old" / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "unet": ["mcvd_diffusers.models.unet_mcvd", "MCVDUNet2DModel"]}))
    pipe = MCVDPipeline.from_pretrained(tmp_path / "old")
    assert type(pipe.unet) is MCVDUNet2DModel
    saved = tiny.unet.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in pipe.unet.state_dict().items())
    # The same frames as the folder that names the new module, both loaded by from_pretrained. Not the in-memory
    # model's: loaded weights may start off a 64-byte boundary (seen: 44), and there an AVX2-only CPU (AMD Zen 3)
    # rounds the first Linear differently (1e-7) from the same weights, bit for bit, aligned.
    np.testing.assert_array_equal(predict(pipe), predict(MCVDPipeline.from_pretrained(tmp_path / "new")))


def test_a_folder_that_is_not_an_mcvd_pipeline_is_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "other")
    index_path = tmp_path / "other" / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "_class_name": "DDPMPipeline"}))
    with pytest.raises(ValueError, match="names the pipeline class 'DDPMPipeline', not MCVDPipeline"):
        add_remote_code(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        add_remote_code(tmp_path)


SHIPPED = REPO / "checkpoints" / "mmnist-5to10"


@pytest.mark.parametrize("shipped", [SHIPPED, REPO / "checkpoints" / "mmnist-general"], ids=["5to10", "general"])
def test_the_shipped_model_carries_this_versions_code_and_loads_with_plain_diffusers(tmp_path, shipped):
    index = json.loads((shipped / "model_index.json").read_text())
    stale = [name for name in REMOTE_FILES if (shipped / name).read_bytes() != (PACKAGE_DIR / name).read_bytes()]
    assert not stale and index["_class_name"] == ["pipeline_mcvd", "MCVDPipeline"], (
        f"the shipped folder's remote code {stale} is older than the package: refresh it with "
        f"python -c \"from mcvd_diffusers.remote_code import add_remote_code; add_remote_code('{shipped.relative_to(REPO)}')\"")
    info, frames, _ = run_plain_diffusers(str(shipped), tmp_path, HF_HUB_OFFLINE="1")
    np.testing.assert_allclose(frames, predict(MCVDPipeline.from_pretrained(shipped)), rtol=0, atol=1e-6)
    assert info["pipeline"] == "diffusers_modules.local.pipeline_mcvd.MCVDPipeline"
