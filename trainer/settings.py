"""Dataclass fields that carry their help text, shared by the CLI, TOML files and node tooltips.

Each stage has one config dataclass whose defaults are the SELMA paper's values. A field's help
text is written once, in ``setting(...)``, and every surface reads it from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and its help text (``metadata["help"]``).

    ``choices`` lists a setting's values; ``renamed`` maps old names of choices to their current names,
    which files, flags and saved workflows written before a rename still hold (see :func:`current_choice`).
    """
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def help_of(config_class: type, name: str) -> str:
    """The help text of one field, for a tooltip or a ``--help`` line."""
    for config_field in dataclasses.fields(config_class):
        if config_field.name == name:
            return config_field.metadata.get("help", "")
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def default_of(config_class: type, name: str) -> Any:
    """The default value of one field, so a node widget shows the same default as the CLI."""
    for config_field in dataclasses.fields(config_class):
        if config_field.name == name:
            if config_field.default is not dataclasses.MISSING:
                return config_field.default
            return config_field.default_factory()  # type: ignore[misc]
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def renamed_choices(config_class: type, name: str) -> dict[str, str]:
    """Old names of a setting's choices → their current names; empty when nothing was renamed."""
    for config_field in dataclasses.fields(config_class):
        if config_field.name == name:
            return dict(config_field.metadata.get("renamed", {}))
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def print_notice(message: str) -> None:
    """Where a notice goes when its reader has no listener: standard error, one line."""
    print(message, file=sys.stderr, flush=True)


def current_choice(config_class: type, name: str, value: Any, source: str,
                   notify: Callable[[str], None] | None = None) -> Any:
    """``value`` of setting ``name``, an old name of a choice replaced by its current one.

    What was written before a rename keeps working, and ``notify`` (default: standard error) tells
    the user the name to write from now on; ``source`` (a file, a command, a widget) starts the notice.
    """
    renamed = renamed_choices(config_class, name)
    if not isinstance(value, str) or value not in renamed:
        return value
    (notify or print_notice)(f"{source}: {name} {value!r} is the old name of {renamed[value]!r}; read as "
                             f"{renamed[value]!r}")
    return renamed[value]


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of ``config_class`` (underscores become dashes).

    Booleans become ``--x/--no-x``; other types parse with the type of the default. A field whose
    default is ``None`` parses as a string unless its metadata names a ``type``. Old names of renamed
    choices are accepted (the config reader maps them, with a notice) but not listed.
    """
    for config_field in dataclasses.fields(config_class):
        if config_field.name in skip or not config_field.init:
            continue
        default = default_of(config_class, config_field.name)
        flag = "--" + config_field.name.replace("_", "-")
        help_text = config_field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        choices = config_field.metadata.get("choices")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=config_field.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        value_type = config_field.metadata.get("type") or (type(default) if default is not None else str)
        renamed = config_field.metadata.get("renamed", {})
        listed = {"choices": (*choices, *renamed), "metavar": "{" + ",".join(choices) + "}"} if renamed else \
            {"choices": choices}
        parser.add_argument(flag, dest=config_field.name, type=value_type, default=default,
                            help=f"{help_text} (default: {str(default).replace('%', '%%')})", **listed)


def config_from_arguments(config_class: type[ConfigT], arguments: argparse.Namespace, **overrides: Any) -> ConfigT:
    """Build ``config_class`` from parsed arguments; fields the parser lacks keep their defaults."""
    values = {
        config_field.name: getattr(arguments, config_field.name)
        for config_field in dataclasses.fields(config_class)
        if config_field.init and hasattr(arguments, config_field.name)
    }
    values.update(overrides)
    return config_class(**values)
