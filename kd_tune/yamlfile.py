"""YAML files read within limits: size, UTF-8, nesting depth and alias expansion, checked before anything is built.

A config is ~3 KB and 4 levels deep, a search space smaller; the limits leave room and stop alias bombs (a 400-byte
"billion laughs" file expands to 10^9 values). Every refusal is a ConfigError naming the file (or --set value).
"""

from __future__ import annotations

import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from kd_tune.errors import SHOWN_CHARS, ConfigError
from kd_tune.signing import SpecialFileError, read_regular

MAX_YAML_BYTES = 256 * 1024
MAX_YAML_DEPTH = 16  # nested mappings and lists
MAX_YAML_VALUES = 10_000  # values once every alias is expanded: a 400-byte "billion laughs" file expands to 10^9
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the same documents, faster


def read_yaml(path: Path | Traversable, *, source: str) -> Any:
    """A YAML file's value, read within MAX_YAML_BYTES; OSError (a missing file) is left to the caller."""
    try:  # a FIFO or device would block or never end: refused before it is opened (a packaged built-in may be
        # no file of its own)
        if isinstance(path, (str, os.PathLike)):
            data = read_regular(path, MAX_YAML_BYTES)
        else:
            with path.open("rb") as f:
                data = f.read(MAX_YAML_BYTES + 1)
    except SpecialFileError as error:
        raise ConfigError(source, [f"not a regular file ({error.kind}); allowed: a YAML file"]) from None
    return yaml_from_bytes(data, source=source)


def yaml_from_bytes(data: bytes | None, *, source: str) -> Any:
    """The value of a YAML file's bytes: refused past MAX_YAML_BYTES (None: read_regular found it larger), when not
    UTF-8, or as parse_yaml refuses."""
    if data is None or len(data) > MAX_YAML_BYTES:
        raise ConfigError(source, [f"larger than {MAX_YAML_BYTES // 1024} KiB; allowed: a YAML file up to that size"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); allowed: a "
                                   "UTF-8 YAML file"]) from None
    return parse_yaml(text, source=source)


def parse_yaml(text: str, *, source: str) -> Any:
    """yaml.safe_load within MAX_YAML_DEPTH and MAX_YAML_VALUES, checked on the event stream before building."""
    try:
        _check_yaml_shape(text, source=source)
        return yaml.load(text, Loader=YAML_LOADER)
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int past Python's 4300-digit limit
        mark = getattr(e, "problem_mark", None) if "\n" in text.strip() else None  # a --set value is one line
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}not valid YAML ({str(getattr(e, 'problem', None) or e)[:200]}); allowed: "
                                   "plain YAML: mappings, lists, strings, numbers, booleans, null"]) from None


def _check_yaml_shape(text: str, *, source: str) -> None:
    """Refuse deep nesting, recursive aliases and alias expansion past MAX_YAML_VALUES, counting each node's
    expanded size once on the event stream: the time is linear in the text however much the aliases expand."""
    open_sizes: list[int] = []  # expanded size so far of each open mapping or list
    open_anchors: list[str | None] = []
    finished: dict[str, int] = {}  # anchor -> expanded size of its complete node
    for event in yaml.parse(text, Loader=YAML_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            open_sizes.append(1)
            open_anchors.append(event.anchor)
            if len(open_sizes) > MAX_YAML_DEPTH:
                raise _shape_error(source, event, f"nested deeper than {MAX_YAML_DEPTH} levels")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_sizes.pop(), open_anchors.pop()
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in finished:
                raise _shape_error(source, event, f"alias *{event.anchor[:SHOWN_CHARS]} refers to a value that is not "
                                   "complete (a recursive or undefined alias)")
            size, anchor = finished[event.anchor], None
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1, event.anchor
        else:
            continue
        if anchor is not None:
            finished[anchor] = size
        if open_sizes:
            open_sizes[-1] += size
        if (open_sizes[-1] if open_sizes else size) > MAX_YAML_VALUES:
            raise _shape_error(source, event, f"expands to more than {MAX_YAML_VALUES} values (through aliases)")


def _shape_error(source: str, event: yaml.Event, what: str) -> ConfigError:
    line = f"line {event.start_mark.line + 1}: " if event.start_mark else ""
    return ConfigError(source, [f"{line}{what}; allowed: up to {MAX_YAML_DEPTH} levels and {MAX_YAML_VALUES} "
                                "values, aliases of complete values only"])
