"""YAML data files (device profiles, the service catalogue) validated against a pydantic model.

One loader, so every data file reports its mistakes the same way: the file, the line and the
field, in one sentence an installer can act on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
_NAMED = re.compile(r"([A-Za-z_]+(?:\.[A-Za-z0-9_]+)+): ")


class DataFileError(Exception):
    """A data file is wrong; the message names the file and, where known, the line."""


def load_model(path: Path, model: type[M], what: str) -> M:
    """Parse `path` as YAML and validate it as `model`; errors become one-line DataFileErrors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DataFileError(f"{path.name}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(data, dict):
        raise DataFileError(f"{path.name}: {what} must be a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not loc and (named := _NAMED.match(message)):
            # A whole-file check that names where it failed ("services.3: ..."): point there.
            loc = tuple(int(p) if p.isdigit() else p for p in named[1].split("."))
            message = message[named.end() :]
        line = line_of(node, loc)
        where = f" line {line}" if line else ""
        field = ".".join(str(p) for p in loc) or what
        raise DataFileError(f"{path.name}{where}: {field}: {message}") from exc


def line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc`, as deep as the path can be followed."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line
