"""YAML data files (device profiles, the service catalogue) validated against a pydantic model.

One loader, so every data file reports its mistakes the same way: the file, the line and the
field, in one sentence an installer can act on. The settings file and the inventory find their
lines with the same two functions (`line_of`, `parse_error_line`).
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
        problem = getattr(exc, "problem", exc)
        raise DataFileError(f"{path.name}{parse_error_line(exc)}: not valid YAML ({problem})") from exc
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
        # A check of the whole file (no field) points at where the file starts.
        line = line_of(node, loc) or (node.start_mark.line + 1 if node is not None else None)
        where = f" line {line}" if line else ""
        field = ".".join(str(p) for p in loc) or what
        raise DataFileError(f"{path.name}{where}: {field}: {message}") from exc


def line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line where the key (or list item) at `loc` is written, as deep as the path can
    be followed; None when not even its first part is there. Of a key written twice, the last
    (the one the loader keeps)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
            if not found:
                break
            key, node = found[-1]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_error_line(exc: yaml.YAMLError) -> str:
    """ " line N" where the YAML parser gave up, or "" when it did not say."""
    mark = getattr(exc, "problem_mark", None)
    return f" line {mark.line + 1}" if mark is not None else ""
