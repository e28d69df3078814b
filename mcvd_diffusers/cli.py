"""Command-line flags generated from the config dataclasses (``TrainConfig``, ``EvalConfig``): a flag per field
(``--max_steps 500``) with the help text of its metadata (``config.key``). Booleans take ``--flag`` or ``--flag
false``, lists several values (``--samplers ddim:20 dpm++:20``); text is checked as config-file values are
(``coerce``). ``FlagParser`` (the benchmarks and scripts use it too) takes ``--max-steps`` as well."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .config import allowed_types


def add_config_flags(parser: argparse.ArgumentParser, cls, required: tuple[str, ...] = (), title: str | None = None
                     ) -> None:
    """A flag per field of ``cls``; only the flags given on the command line reach the parsed namespace."""
    group = parser.add_argument_group(title or f"the keys of {cls.__name__}")
    for f in dataclasses.fields(cls):
        _, allowed = allowed_types(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "required" if f.name in required else f"default: {default}"
        help_text = f"{f.metadata.get('help', '')} ({shown})".lstrip()
        options = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text, required=f.name in required)
        if bool in allowed:
            options.update(nargs="?", const="true", metavar="true|false")
        elif any(typing.get_origin(t) is list for t in allowed):
            options.update(nargs="+", metavar="VALUE")
        else:
            options.update(metavar=f.name.upper())
        group.add_argument(f"--{f.name}", **options)


def _respell(flag: str, known) -> str:
    """``--num-clips`` as ``--num_clips`` (or the reverse) where only the other spelling is a flag."""
    if flag.startswith("--") and flag not in known:
        for other in ("--" + flag[2:].replace("-", "_"), "--" + flag[2:].replace("_", "-")):
            if other in known:
                return other
    return flag


class FlagParser(argparse.ArgumentParser):
    """argparse taking every long flag in both spellings, ``--num_clips`` and ``--num-clips``, as
    huggingface's ``HfArgumentParser`` does; the help shows the spelling a flag was defined with."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)  # after "--" every word is a value
        respelled = [_respell(flag, self._option_string_actions) + sep + value
                     for flag, sep, value in (arg.partition("=") for arg in args[:end])]
        return super().parse_known_args(respelled + args[end:], namespace)


def refuse_unknown_flags(parser: argparse.ArgumentParser, argv: list[str], cls, hints: dict[str, str] = ()) -> None:
    """A flag that is no key of ``cls`` ends in an error naming the valid keys; the old flags named in
    ``hints`` in one naming what replaced them."""
    known, hints = parser._option_string_actions, dict(hints)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if not arg.startswith("--") or _respell(flag, known) in known:
            continue
        if flag in hints:
            parser.error(f"{flag} is not a flag any more: use {hints[flag]}")
        keys = sorted(f.name for f in dataclasses.fields(cls))
        parser.error(f"unknown config keys {[flag[2:]]}; valid keys: {keys}")


def given_values(namespace: argparse.Namespace, cls) -> dict:
    """The config values given on the command line (as text), by field name."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names}
