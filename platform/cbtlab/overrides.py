"""Command-line overrides of an experiment config (`--set section.key=value`) and the error
every bad config value raises. Imports nothing heavy, so that a command's `--help` stays quick."""

from __future__ import annotations

import json
from typing import Any


class ConfigError(ValueError):
    """A config value is unknown or out of range; the message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name, self.message = field_name, message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its two arguments: raised in a Ray worker, it reaches the driver as
        # itself (the default pickling passes one argument, and unpickling it failed).
        return (type(self), (self.field_name, self.message))


def add_override_argument(parser: Any) -> None:
    """The `--set section.key=value` flag (repeatable) of every command; parse the collected
    `args.overrides` with `parse_override`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field, e.g. --set model.depth=6 (repeatable)",
    )


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `section.key=value` command-line override; the value is read as JSON if it can
    be (numbers, true/false, lists), else kept as a string."""
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise ConfigError(text, "expected an override of the form section.key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
