"""Command-line flags from the config dataclasses: each setting's name, type and default are
written once, in the dataclass the library uses, so the CLI cannot drift from it.

    add_config_arguments(parser, HeadsTrainConfig, help={"num_heads": "draft heads"})
    cfg = config_from_arguments(HeadsTrainConfig, args)
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def add_config_arguments(parser: argparse.ArgumentParser, config: type, help: dict[str, str] | None = None,
                         skip: tuple[str, ...] = ()) -> None:
    """--field-name for every field of `config` (but `skip`): its type and default from the
    dataclass (a bool that defaults to False is a switch), help text from `help`."""
    help = help or {}
    types = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        flag, text = "--" + f.name.replace("_", "-"), help.get(f.name)
        kind = types[f.name]
        if kind is bool and f.default is False:
            parser.add_argument(flag, action="store_true", help=text)
        elif kind in (int, float, str):
            shown = f" (default: {f.default})" if f.default not in ("", None) else ""
            parser.add_argument(flag, type=kind, default=f.default, help=(text or "") + shown or None)
        else:
            raise TypeError(f"{config.__name__}.{f.name}: no command-line form for {kind}")


def config_from_arguments(config: type, args: argparse.Namespace, **overrides):
    """The config built from the parsed flags that add_config_arguments added (and overrides)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**{**values, **overrides})
