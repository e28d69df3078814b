"""Remote code for exported pipelines: the Python files plain diffusers runs to load one without this package.

A pipeline folder saved by ``MCVDPipeline.save_pretrained`` names this package's classes in its
model_index.json (``"_class_name": "MCVDPipeline"``, ``"unet": ["mcvd_diffusers.unet.unet_mcvd", ...]``),
which diffusers alone cannot import. ``add_remote_code(folder)`` copies three of the package's files into
the folder, unchanged, and points model_index.json at the copies, so that both of these load it:

    DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)  # diffusers only
    MCVDPipeline.from_pretrained(folder_or_repo_id)  # this package's classes; runs no code from the folder

The package keeps these files where an export needs them (``REMOTE_FILES``, paths relative to the package and
to the folder alike), and they import only each other, the standard library, torch, numpy, PIL, diffusers,
huggingface_hub and safetensors (tests/test_remote_code.py checks it with diffusers' own import patterns):

    pipeline_mcvd.py    "_class_name": ["pipeline_mcvd", "MCVDPipeline"]; imports .integrity, .unet.unet_mcvd
    integrity.py        the weight checks from_pretrained runs
    unet/unet_mcvd.py   "unet": ["unet_mcvd", "MCVDUNet2DModel"]; imports no file of the folder

How diffusers (0.42) uses them: ``_class_name`` = [module, class] with ``<module>.py`` at the folder's root
makes a custom pipeline, whose relative imports diffusers copies (or downloads from the Hub) beside it; a
component entry [module, class] with ``<component>/<module>.py`` is a custom component, loaded from its
folder on its own. So diffusers runs ``unet/unet_mcvd.py`` twice per load, and the file's last lines make
both runs give one class.
"""

from __future__ import annotations

import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REMOTE_FILES = ("pipeline_mcvd.py", "integrity.py", "unet/unet_mcvd.py")
# The first line of the files earlier versions generated (rewritten copies): removed when a folder is exported again.
OLD_MARKER = "# mcvd-diffusers remote code:"


def add_remote_code(folder: str | Path) -> list[str]:
    """Makes a saved MCVDPipeline folder loadable with plain diffusers (``trust_remote_code=True``): copies
    ``REMOTE_FILES`` into it and names them in model_index.json. Running it again gives the same files.
    Returns the files written, relative to ``folder``."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved pipeline: model_index.json is missing")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("_class_name") not in ("MCVDPipeline", ["pipeline_mcvd", "MCVDPipeline"]):
        raise ValueError(f"{folder}: model_index.json names the pipeline class {index.get('_class_name')!r}, "
                         "not MCVDPipeline")
    if not (isinstance(index.get("unet"), list) and index["unet"][-1] == "MCVDUNet2DModel"):
        raise ValueError(f"{folder}: model_index.json's unet is {index.get('unet')!r}, not an MCVDUNet2DModel")
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{folder} has no unet/ folder for its component 'unet'")
    for stale in sorted(folder.glob("*.py")) + sorted(folder.glob("*/*.py")):
        if stale.relative_to(folder).as_posix() not in REMOTE_FILES and _written_by_an_earlier_export(stale):
            stale.unlink()
    for name in REMOTE_FILES:
        (folder / name).write_bytes((PACKAGE_DIR / name).read_bytes())
    index["_class_name"] = ["pipeline_mcvd", "MCVDPipeline"]
    index["unet"] = ["unet_mcvd", "MCVDUNet2DModel"]
    # The format diffusers writes model_index.json in (ConfigMixin.to_json_string).
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(REMOTE_FILES)


def _written_by_an_earlier_export(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(OLD_MARKER)
