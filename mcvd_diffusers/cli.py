"""One command-line style for both commands, generated from the config dataclasses.

Every field of a config (``TrainConfig``, ``EvalConfig``) is a flag spelled like the field
(``--max_steps 500``, ``--num_clips 64``), with its help text taken from the comment beside the
field. Booleans take ``--flag`` (true) or ``--flag false``; lists take several values
(``--samplers ddim:20 dpm++:20``). Values given as text are read as YAML scalars and checked
against the field's type (``coerce``), the same way as values from a config file. The other
spelling (``--max-steps``) is refused with the right one, never silently accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import types
import typing


def field_docs(cls) -> dict[str, str]:
    """The help text of each field in ``cls``'s source: the comment on its line, else the comment
    lines right above it."""
    lines = inspect.getsource(cls).splitlines()
    comments = {}  # line number -> the text of a comment token on it
    for token in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("# ").strip()
    docs, above = {}, []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments.get(number, ""))
            continue
        name = stripped.split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and ":" in stripped and name.isidentifier():
            docs[name] = comments.get(number) or " ".join(above)
        above = []
    return docs


def _allowed(cls, key: str) -> tuple[object, tuple]:
    hint = typing.get_type_hints(cls)[key]
    return hint, (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))


def coerce(cls, key: str, value):
    """Checks a config value against the field's type; text (a command line) is read as YAML scalars.
    A type with a ``parse`` classmethod (``SamplerSpec``) parses its text form."""
    import yaml

    hint, allowed = _allowed(cls, key)
    if type(None) in allowed and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    for t in allowed:
        if hasattr(t, "parse") and isinstance(value, (str, t)):
            try:
                return t.parse(value)
            except ValueError as e:
                raise ValueError(f"{key} must be {getattr(t, 'FORMAT', t.__name__)} ({e})") from None
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str) \
            and any(typing.get_origin(t) is list for t in allowed) and value[0].startswith("["):
        value = yaml.safe_load(value[0])  # --block_out_channels "[64, 128, 128]"
    if isinstance(value, str) and str not in allowed:
        value = yaml.safe_load(value)
        if isinstance(value, str) and float in allowed:  # YAML reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
    for t in allowed:
        if typing.get_origin(t) is list:
            (item,) = typing.get_args(t)
            if isinstance(value, (list, tuple)):
                items = [yaml.safe_load(v) if isinstance(v, str) and item is not str else v for v in value]
                if all(isinstance(v, item) and not isinstance(v, bool) for v in items):
                    return list(items)
            continue
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise ValueError(f"config key {key!r} expects {hint}, got {value!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls, required: tuple[str, ...] = (), title: str | None = None
                     ) -> None:
    """A flag per field of ``cls``; only the flags given on the command line reach the parsed namespace."""
    docs = field_docs(cls)
    group = parser.add_argument_group(title or f"the keys of {cls.__name__}")
    for f in dataclasses.fields(cls):
        _, allowed = _allowed(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "required" if f.name in required else f"default: {default}"
        options = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{docs.get(f.name, '')} ({shown})".lstrip(),
                       required=f.name in required)
        if bool in allowed:
            options.update(nargs="?", const="true", metavar="true|false")
        elif any(typing.get_origin(t) is list for t in allowed):
            options.update(nargs="+", metavar="VALUE")
        else:
            options.update(metavar=f.name.upper())
        group.add_argument(f"--{f.name}", **options)


def refuse_other_spellings(parser: argparse.ArgumentParser, argv: list[str], cls, hints: dict[str, str] = ()) -> None:
    """``--max-steps`` for ``--max_steps`` (and the old flags named in ``hints``) end in an error naming
    the spelling to use; a flag that is no key of ``cls`` in one naming the valid keys."""
    known = {option for action in parser._actions for option in action.option_strings}
    hints = dict(hints)
    for arg in argv:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        if flag in known:
            continue
        if flag in hints:
            parser.error(f"{flag} is not a flag any more: use {hints[flag]}")
        respelled = "--" + flag[2:].replace("-", "_")
        if respelled in known:
            parser.error(f"{flag} is spelled {respelled} (both commands spell flags like the config keys)")
        keys = sorted(f.name for f in dataclasses.fields(cls))
        parser.error(f"unknown config keys {[flag[2:]]}; valid keys: {keys}")


def given_values(namespace: argparse.Namespace, cls) -> dict:
    """The config values given on the command line (as text), by field name."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names}
