"""Each row's parameter values and file name, checked before anything runs.

Values come, in rising precedence, from the template's defaults, `--set NAME=VALUE` (text that may name
a row's columns as `{column}`), the row's columns that name parameters, and a JSONL row's `params`.
Other columns are only names for the patterns. `seed=random` draws a seed for the row, recorded in
the manifest so the image can be made again.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Any

from zimage_serve.batch.rows import Row
from zimage_serve.errors import InvalidParameterError
from zimage_serve.templates.document import Template, TemplateParameterError

DEFAULT_PATTERN = "{row:04d}"
RANDOM = "random"
MAX_NAME = 200
UNSAFE = re.compile(r'[\x00-\x1f\x7f\\:*?"<>|]')


@dataclass(frozen=True)
class Assignment:
    name: str
    value: str


@dataclass(frozen=True)
class Planned:
    row: Row
    values: dict[str, Any]
    graph: dict[str, Any] | None
    name: str
    seed: Any
    error: str | None = None


def parse_sets(texts: list[str], template: Template) -> list[Assignment]:
    """`--set NAME=VALUE` for each text; a name the template does not have is a usage error."""
    assignments = []
    for text in texts:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidParameterError("--set", f"{text!r} must look like NAME=VALUE (e.g. seed=42)")
        if name not in template.parameters:
            known = ", ".join(template.parameters)
            raise InvalidParameterError("--set", f"{name!r} is not a parameter of {template.name}; it has {known}")
        assignments.append(Assignment(name, value))
    return assignments


def check_pattern(pattern: str) -> str:
    try:
        list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise InvalidParameterError("--name", f"{pattern!r}: {exc}") from None
    return pattern


def plan_row(row: Row, template: Template, sets: list[Assignment], pattern: str) -> Planned:
    """The row's values, graph and file name; a row that cannot run keeps the name its pattern gives where
    one can be formed, so its manifest line names it."""
    if row.error is not None:
        return Planned(row, {}, None, _name(pattern, row, {}, None, template)[0], None, row.error)
    given: dict[str, Any] = {}
    try:
        for assignment in sets:
            given[assignment.name] = _formatted(assignment.value, row, f"--set {assignment.name}")
    except ValueError as exc:
        return Planned(row, {}, None, _name(pattern, row, {}, None, template)[0], None, str(exc))
    for key, value in row.fields.items():
        parameter = template.parameters.get(key)
        if parameter is None:
            continue
        if row.from_text and parameter.type != "string" and isinstance(value, str) and not value.strip():
            continue  # an empty cell leaves the parameter as --set or the template has it
        given[key] = value
    given.update(row.params)
    if "seed" in template.parameters and given.get("seed") == RANDOM:
        given["seed"] = random.randrange(2**32)
    seed = given.get("seed", template.parameters["seed"].default if "seed" in template.parameters else None)
    try:
        graph = template.render(given)
    except TemplateParameterError as exc:
        problems = "; ".join(f"{k}: {reason}" for k, reason in exc.problems.items())
        return Planned(row, given, None, _name(pattern, row, given, seed, template)[0], seed, problems)
    if seed is not None and "seed" in template.parameters:
        seed = template.parameters["seed"].check(seed)  # as the graph has it: "42" from a CSV cell is 42
    name, unnamed = _name(pattern, row, given, seed, template)
    if unnamed is not None:
        return Planned(row, given, None, "", seed, f"--name {pattern!r}: {unnamed}")
    return Planned(row, given, graph, name, seed)


def _name(pattern: str, row: Row, given: dict[str, Any], seed: Any, template: Template) -> tuple[str, str | None]:
    """(the file stem the pattern gives for the row, "") or ("", why it cannot be formed)."""
    fields = {**given, **row.fields, "row": row.number, "seed": seed, "template": template.name}
    try:
        return safe_name(pattern.format_map(_Fields(fields))), None
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:  # a format the value has not
        return "", f"no column or parameter {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)


def safe_name(text: str) -> str:
    """A relative file stem inside the output folder; subfolders allowed, nothing that leaves it."""
    parts = []
    for part in text.replace("\\", "/").split("/"):
        part = UNSAFE.sub("_", part).strip()
        if part in ("", ".", ".."):
            raise ValueError(f"the name {text!r} has an empty, '.' or '..' part")
        parts.append("_" + part[1:] if part.startswith(".") else part)
    name = "/".join(parts)
    if len(name) > MAX_NAME:
        raise ValueError(f"the name {text[:40]!r}... is longer than {MAX_NAME} characters")
    return name


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


def _formatted(value: str, row: Row, where: str) -> str:
    if "{" not in value:
        return value
    try:
        return value.format_map(_Fields({**row.fields, "row": row.number}))
    except KeyError as exc:
        raise ValueError(f"{where}: the row has no column {exc.args[0]!r}") from None
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{where}: {exc} (write {{{{ and }}}} for braces)") from None
