"""Remote code for exported pipelines: the Python files plain diffusers runs to load one without this package.

A pipeline folder saved by ``MCVDPipeline.save_pretrained`` names this package's classes in its
model_index.json (``"_class_name": "MCVDPipeline"``, ``"unet": ["mcvd_diffusers.models.unet_mcvd", ...]``),
which diffusers alone cannot import. ``add_remote_code(folder)`` copies the package's own source files into the
folder and points model_index.json at the copies, so that both of these load it:

    DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)  # diffusers only
    MCVDPipeline.from_pretrained(folder_or_repo_id)  # this package's classes; runs no code from the folder

Files written, for the package's current sources (model_index.json entries after the arrow):

    pipeline_mcvd.py   <- mcvd_diffusers/pipeline_mcvd.py   "_class_name": ["pipeline_mcvd", "MCVDPipeline"]
    unet/unet_mcvd.py  <- mcvd_diffusers/models/unet_mcvd.py  "unet": ["unet_mcvd", "MCVDUNet2DModel"]
    integrity.py       <- mcvd_diffusers/integrity.py (a package module pipeline_mcvd.py imports)

How diffusers (0.42) uses them:

* ``_class_name`` = [module, class] with ``<module>.py`` at the folder's root makes it a custom pipeline. A local
  folder loads the file in place; for a Hub repo, ``DiffusionPipeline.download`` fetches it with
  ``hf_hub_download`` (with the Hub's commit from ``model_info``), and the pipeline is then loaded from the
  downloaded snapshot like a local folder.
* A component entry [module, class] with ``<component>/<module>.py`` is a custom component: it is always loaded
  from the local folder or snapshot, whose download includes ``<component>/<module>.py`` and nothing else of it.
  So a component file must not import other files of the folder: ``unet/unet_mcvd.py`` imports none.
* The pipeline file's relative imports (``from .x import y``, ``from .unet.unet_mcvd import y``) are copied or
  downloaded beside it; diffusers finds them with a regular expression over the text, does not follow them
  further for a local folder, and does not see ``from . import x``. The pipeline's import of the UNet module
  is rewritten to the component's file (``.models.unet_mcvd`` -> ``.unet.unet_mcvd``); the other package
  modules it imports are copied to the root under their own names, unchanged.

diffusers executes ``unet/unet_mcvd.py`` twice per load, as the pipeline's import and as the unet component,
under two module names; a footer makes both give the first class made from that source, so the unet is an
instance of the class the pipeline expects (otherwise diffusers warns "Expected types for unet").

Anything in the sources outside these rules (a package module diffusers could not fetch, an import of
``mcvd_diffusers``, a library beyond ``ALLOWED_LIBRARIES``) raises ``RemoteCodeError`` at export instead of
writing a folder that fails to load. The files written depend only on the package's sources and the folder's
model_index.json: the same bytes for the same sources, with no path of the exporting machine.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import re
import sys
from pathlib import Path

PACKAGE = "mcvd_diffusers"
PACKAGE_DIR = Path(__file__).resolve().parent
# The third-party libraries remote code may import: what an environment that loads a diffusers pipeline has.
ALLOWED_LIBRARIES = ("torch", "numpy", "PIL", "diffusers", "huggingface_hub", "safetensors")
MARKER = "# mcvd-diffusers remote code:"
_REGISTRY = "_mcvd_diffusers_remote_code"

# The patterns diffusers (utils/dynamic_modules_utils.py) reads a module file's imports with.
_DIFFUSERS_RELATIVE = (re.compile(r"^\s*import\s+\.(\S+)\s*$", re.M), re.compile(r"^\s*from\s+\.(\S+)\s+import", re.M))
_DIFFUSERS_ABSOLUTE = (re.compile(r"^\s*import\s+(\S+)\s*$", re.M), re.compile(r"^\s*from\s+(\S+)\s+import", re.M))


class RemoteCodeError(RuntimeError):
    """The package's sources cannot be turned into remote code that diffusers loads (raised at export)."""


def add_remote_code(folder: str | Path) -> list[str]:
    """Makes a saved MCVDPipeline folder loadable with plain diffusers (``trust_remote_code=True``).

    Writes the remote-code files (see the module docstring) and rewrites model_index.json's ``_class_name`` and
    package component entries to name them; removes remote-code files an earlier call wrote that the current
    sources no longer need. Running it again on a folder it has processed gives the same files (fresh copies of
    the current sources). Returns the files written, relative to ``folder``.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved pipeline: model_index.json is missing")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    files, new_index = render_remote_code(index)
    for name in files:
        component = name.split("/")[0] if "/" in name else None
        if component is not None and not (folder / component).is_dir():
            raise FileNotFoundError(f"{folder} has no {component}/ folder for its component {component!r}")
    for stale in sorted(folder.glob("*.py")) + sorted(folder.glob("*/*.py")):
        name = stale.relative_to(folder).as_posix()
        if name not in files and _is_generated(stale):
            stale.unlink()
    for name, text in files.items():
        (folder / name).write_bytes(text.encode("utf-8"))
    # The format diffusers writes model_index.json in (ConfigMixin.to_json_string).
    index_path.write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(files)


def render_remote_code(index: dict, package_dir: str | Path = PACKAGE_DIR) -> tuple[dict[str, str], dict]:
    """The remote-code files ({path in the folder: text}) and the new model_index.json for a pipeline whose
    model_index.json is ``index`` (as this package saves it, or as ``add_remote_code`` left it), made from the
    package sources in ``package_dir``. Raises RemoteCodeError where diffusers could not load the result."""
    from . import __version__
    from .pipeline_mcvd import MCVDPipeline

    package_dir = Path(package_dir)
    pipeline_module = MCVDPipeline.__module__
    pipeline_name = _basename(pipeline_module)
    class_name = index.get("_class_name")
    if class_name not in (MCVDPipeline.__name__, [pipeline_name, MCVDPipeline.__name__]):
        raise RemoteCodeError(f"model_index.json names the pipeline class {class_name!r}, not {MCVDPipeline.__name__}")

    # The package's component classes: those the pipeline's __init__ annotates, as MCVDPipeline.load_config does.
    components = {}  # component name -> package module
    for name, annotation in inspect.get_annotations(MCVDPipeline.__init__, eval_str=True).items():
        module = getattr(annotation, "__module__", "")
        if not module.startswith(PACKAGE + "."):
            continue
        entry = index.get(name)
        if entry not in ([module, annotation.__name__], [_basename(module), annotation.__name__]):
            raise RemoteCodeError(f"model_index.json has {name}={entry!r}; expected [{module!r}, "
                                  f"{annotation.__name__!r}] (as MCVDPipeline saves it)")
        components[name] = module
    for name, entry in index.items():
        if name not in components and isinstance(entry, list) and str(entry[0]).startswith(PACKAGE):
            raise RemoteCodeError(f"model_index.json's {name}={entry!r} is a class of this package that "
                                  "remote_code.py does not know how to ship; add it to MCVDPipeline's __init__ "
                                  "annotations or to remote_code.py")
    component_of = {module: name for name, module in components.items()}

    pipeline_source = _read(package_dir, pipeline_module)
    tree = _parse(pipeline_source, pipeline_module)
    edits = []  # (node, replacement statement)
    helpers = []  # package modules copied to the root unchanged
    imported = {}  # component module -> names the pipeline imports from it
    for node in _imports(tree, pipeline_module):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        target = f"{PACKAGE}.{node.module}"
        if target in component_of:
            new_module = f"{component_of[target]}.{_basename(target)}"
            edits.append((node, ast.unparse(ast.ImportFrom(module=new_module, names=node.names, level=1))))
            imported.setdefault(target, set()).update(alias.name for alias in node.names)
        elif "." not in node.module and (package_dir / f"{node.module}.py").is_file() and \
                node.module not in components and node.module != pipeline_name:
            if target not in helpers:
                helpers.append(target)
        else:
            raise RemoteCodeError(
                f"{_file(pipeline_module)} imports .{node.module}: remote code can ship the UNet's module (in its "
                f"component folder) and top-level modules of {PACKAGE} (beside the pipeline), not this one"
            )
    if not edits and components:
        raise RemoteCodeError(f"{_file(pipeline_module)} no longer imports {sorted(component_of)} with "
                              "`from .module import Class`, which remote_code.py rewrites")

    files = {}  # path in the folder -> (text, the relative imports diffusers must find in it)
    rewritten = _apply(pipeline_source, edits)
    changes = "; ".join(dict.fromkeys(f".{node.module} -> .{component_of[f'{PACKAGE}.{node.module}']}."
                                      f"{_basename(f'{PACKAGE}.{node.module}')}" for node, _ in edits))
    files[f"{pipeline_name}.py"] = (
        _header(pipeline_module, __version__, f"Imports rewritten to this folder's layout: {changes}.") + rewritten,
        {f"{component_of[m]}.{_basename(m)}" for m in imported} | {_basename(m) for m in helpers},
    )
    for name, module in components.items():
        source = _read(package_dir, module)
        _check_leaf(source, module, "a component's module is loaded on its own")
        body = _header(module, __version__, None) + source
        footer = _footer(body, module, sorted(imported.get(module, ())))
        files[f"{name}/{_basename(module)}.py"] = (body + footer, set())
    for module in helpers:
        source = _read(package_dir, module)
        _check_leaf(source, module, "diffusers does not fetch the imports of an imported file")
        files[f"{_basename(module)}.py"] = (_header(module, __version__, None) + source, set())

    for name, (text, relative) in files.items():
        _check_generated(name, text, relative)
    new_index = dict(index)
    new_index["_class_name"] = [pipeline_name, MCVDPipeline.__name__]
    for name, module in components.items():
        new_index[name] = [_basename(module), index[name][1]]
    return {name: text for name, (text, _) in files.items()}, new_index


# ----------------------------------------------------------------------------- helpers
def _basename(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _file(module: str) -> str:
    """The source file of a package module, relative to the package's parent: mcvd_diffusers/models/x.py."""
    return module.replace(".", "/") + ".py"


def _read(package_dir: Path, module: str) -> str:
    path = package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")
    try:
        return path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    except FileNotFoundError as e:
        raise RemoteCodeError(f"the source file of {module} is missing ({_file(module)}): remote code is made "
                              "from the package's .py files") from e


def _parse(source: str, module: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as e:
        raise RemoteCodeError(f"{_file(module)} does not parse ({e})") from e


def _imports(tree: ast.AST, module: str):
    """Every import in a module (nested ones too), after checking that remote code can run it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_library(alias.name, module)
            yield node
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                _check_library(node.module, module)
            elif node.level > 1 or node.module is None:
                dots = "." * node.level
                raise RemoteCodeError(
                    f"{_file(module)} line {node.lineno}: `from {dots}{node.module or ''} import ...` is invisible "
                    "to diffusers' remote-code loader, which only fetches `from .module import name`"
                )
            yield node


def _check_library(name: str, module: str) -> None:
    root = name.split(".")[0]
    if root == PACKAGE:
        raise RemoteCodeError(f"{_file(module)} imports {name}, which is not importable where the remote code runs; "
                              "use a relative import")
    if root not in ALLOWED_LIBRARIES and root not in sys.stdlib_module_names:
        raise RemoteCodeError(f"{_file(module)} imports {name}; remote code may import the standard library and "
                              f"{', '.join(ALLOWED_LIBRARIES)} only (extend remote_code.ALLOWED_LIBRARIES if a "
                              "diffusers install always has it)")


def _check_leaf(source: str, module: str, why: str) -> None:
    for node in _imports(_parse(source, module), module):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise RemoteCodeError(f"{_file(module)} imports .{node.module}, but remote code cannot ship that: {why}")


def _apply(source: str, edits: list) -> str:
    """``source`` with each import statement of ``edits`` replaced, from the last one back."""
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def position(line: int, column: int) -> int:  # ast columns count UTF-8 bytes
        return offsets[line - 1] + len(lines[line - 1].encode("utf-8")[:column].decode("utf-8"))

    for node, replacement in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        start, end = position(node.lineno, node.col_offset), position(node.end_lineno, node.end_col_offset)
        source = source[:start] + replacement + source[end:]
    return source


def _header(module: str, version: str, changes: str | None) -> str:
    return (f"{MARKER} {_file(module)} of mcvd-diffusers {version}, copied at\n"
            "# export so that DiffusionPipeline.from_pretrained(..., trust_remote_code=True) loads this pipeline\n"
            f"# without the package. {changes or 'The copy is unchanged.'}\n"
            "# Do not edit: export the pipeline again (mcvd_diffusers.remote_code).\n")


def _footer(body: str, module: str, names: list[str]) -> str:
    """Binds ``names`` to the first objects made from this exact source in the process (see the docstring)."""
    if not names:
        return ""
    key = f"{_basename(module)}:{hashlib.sha256(body.encode('utf-8')).hexdigest()[:16]}"
    lines = [
        "",
        "",
        f"{MARKER} diffusers runs this file twice per pipeline load, for the pipeline's",
        "# import and for the component, under two module names. Bind the names the pipeline imports to the",
        "# first objects made from this source, so that both give the same class.",
        "import sys as _sys  # noqa: E402",
        "import types as _types  # noqa: E402",
        "",
        f"_made = _sys.modules.setdefault({_REGISTRY!r}, _types.ModuleType({_REGISTRY!r})).__dict__",
    ]
    lines += [f"{name} = _made.setdefault({f'{key}:{name}'!r}, {name})" for name in names]
    return "\n".join(lines) + "\n"


def _is_generated(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(MARKER)


def _check_generated(name: str, text: str, relative: set[str]) -> None:
    """What diffusers will read from a generated file: exactly the relative imports it must fetch (its regular
    expressions also match text in docstrings), and only libraries remote code may import."""
    try:
        ast.parse(text)
    except SyntaxError as e:  # pragma: no cover - the rewriting keeps statements whole
        raise RemoteCodeError(f"the generated {name} does not parse ({e})") from e
    found = {m for pattern in _DIFFUSERS_RELATIVE for m in pattern.findall(text)}
    if found != relative:
        raise RemoteCodeError(f"diffusers would read the relative imports {sorted(found)} in the generated {name}, "
                              f"not {sorted(relative)}: a line of text (a docstring?) reads like an import")
    for root in {m.split(".")[0] for pattern in _DIFFUSERS_ABSOLUTE for m in pattern.findall(text)} - {""}:
        if root not in ALLOWED_LIBRARIES and root not in sys.stdlib_module_names:
            raise RemoteCodeError(f"diffusers would try to import {root!r} for the generated {name} (a line of "
                                  "text that reads like an import?)")
