"""Remote code for exported pipelines: ``add_remote_code(folder)`` copies ``REMOTE_FILES`` (paths relative to the
package and the folder alike) unchanged into a saved pipeline folder and names them in model_index.json, so that plain
diffusers loads it with ``trust_remote_code=True`` (``MCVDPipeline.from_pretrained`` keeps the package's classes).
diffusers (0.42) loads ``pipeline_mcvd.py`` as a custom pipeline, fetching its relative imports beside it, and
``unet/unet_mcvd.py`` as a custom component on its own: it runs that file twice per load (its last lines make both
runs give one class). The files import only each other, the standard library and diffusers' dependencies (tested)."""

from __future__ import annotations

import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REMOTE_FILES = ("pipeline_mcvd.py", "integrity.py", "unet/unet_mcvd.py")
# The first line of the files earlier versions generated (rewritten copies): removed when a folder is exported again.
OLD_MARKER = "# mcvd-diffusers remote code:"


def add_remote_code(folder: str | Path) -> list[str]:
    """Makes a saved MCVDPipeline folder loadable with plain diffusers; running it again gives the same files.
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
        name = stale.relative_to(folder).as_posix()
        if name not in REMOTE_FILES and stale.read_text(encoding="utf-8", errors="replace").startswith(OLD_MARKER):
            stale.unlink()
    for name in REMOTE_FILES:
        (folder / name).write_bytes((PACKAGE_DIR / name).read_bytes())
    index["_class_name"] = ["pipeline_mcvd", "MCVDPipeline"]
    index["unet"] = ["unet_mcvd", "MCVDUNet2DModel"]
    # The format diffusers writes model_index.json in (ConfigMixin.to_json_string).
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(REMOTE_FILES)
