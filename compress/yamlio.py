"""YAML (or JSON) files in, validated pydantic models out, with one error format for every file kind.

Recipes, benchmark suites and artifact manifests all go through here:

* parsing is strict: a key given twice in one mapping is an error (PyYAML silently keeps the last),
  ``1e-4`` is a float (PyYAML reads it as a string), and absurd nesting is reported, not a traceback;
* validation is strict (``model_validate_json``, strict mode): ``true`` is not a number and ``"3"`` is
  not an int, so a file cannot silently mean something other than what it says;
* every error names the file, the place (``pass #2 ('quantize'), field 'weights.dtype'``) and what was
  expected, in one paragraph.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from compress.errors import DitCompressError

M = TypeVar("M", bound=BaseModel)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads 1e-4 as a float."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text strictly; errors name ``source``, the line and the column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DitCompressError(f"{source}: not valid YAML{at}: {getattr(e, 'problem', None) or e}.") from None
    except RecursionError:
        raise DitCompressError(f"{source}: nested too deeply to be a configuration file.") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of a YAML file; ``what`` ('recipe', 'benchmark suite') names it in errors."""
    p = Path(path)
    if not p.is_file():
        raise DitCompressError(f"{p}: no such {what} file.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DitCompressError(f"{p}: not a text file (a {what} is YAML).") from None
    except OSError as e:
        raise DitCompressError(f"{p}: cannot read the {what} file ({e.strerror}).") from None
    return parse_yaml(text, str(p))


def validate(model_cls: type[M], data: Any, source: str, what: str, tags: list[str] | None = None) -> M:
    """``model_cls`` from plain data (YAML / JSON values), strictly; errors are one ``DitCompressError``.

    ``tags``: the valid values of the tagged union inside (pass names), for 'unknown pass' messages.
    """
    if not isinstance(data, dict):
        found = "an empty file" if data is None else type(data).__name__
        raise DitCompressError(f"{source}: a {what} must be a YAML mapping, found {found}.")
    try:
        payload = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DitCompressError(f"{source}: a {what} holds values that are not plain numbers, strings, lists or "
                               f"mappings ({e}).") from None
    except RecursionError:
        raise DitCompressError(f"{source}: nested too deeply to be a {what}.") from None
    try:
        return model_cls.model_validate_json(payload, strict=True)
    except ValidationError as e:
        raise DitCompressError(f"{source}: invalid {what}: {describe_errors(e, data, model_cls, tags)}.") from None
    except RecursionError:
        raise DitCompressError(f"{source}: nested too deeply to be a {what}.") from None


# ---- error messages -----------------------------------------------------------------------------
def _unwrap(tp: Any) -> list[Any]:
    """The concrete classes an annotation may hold (Optional/Union/Annotated/list/dict values unwrapped)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(tp) for c in _unwrap(a)]
    if origin in (list, tuple, dict):
        args = typing.get_args(tp)
        return _unwrap(args[-1]) if args else []
    return [tp]


def _pick(members: list[type[BaseModel]], d: Any) -> type[BaseModel] | None:
    """The union member ``d`` is meant to be: the only one, or the one whose Literal tags ``d`` carries."""
    if len(members) == 1:
        return members[0]
    for cls in members:
        tags = [(f.alias or n, typing.get_args(f.annotation)) for n, f in cls.model_fields.items()
                if typing.get_origin(f.annotation) is typing.Literal]
        if tags and isinstance(d, dict) and all(d.get(k) in vals for k, vals in tags):
            return cls
    return None


def _allowed(model_cls: type[BaseModel] | None, path: list, data: Any) -> list[str] | None:
    """Field names allowed in the mapping at ``path`` of ``data`` (None when that cannot be told)."""
    cls, d, members = model_cls, data, None
    for part in path:
        if isinstance(part, int):
            d = d[part] if isinstance(d, list) and 0 <= part < len(d) else None
            cls = _pick(members, d) if members else None
            continue
        if cls is None:
            return None
        fields = {f.alias or n: f for n, f in cls.model_fields.items()}
        if part not in fields:
            return None
        d = d.get(part) if isinstance(d, dict) else None
        members = [c for c in _unwrap(fields[part].annotation) if isinstance(c, type) and issubclass(c, BaseModel)]
        cls = None if isinstance(d, list) else _pick(members, d) if members else None
    return [f.alias or n for n, f in cls.model_fields.items()] if cls is not None else None


def _data_path(loc: tuple, data: Any, keep_last: bool) -> list:
    """The part of a pydantic error location that exists in the data (union branch labels and tags dropped)."""
    out, d = [], data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(d, list) and 0 <= part < len(d):
            out.append(part)
            d = d[part]
        elif isinstance(part, str) and isinstance(d, dict) and part in d:
            out.append(part)
            d = d[part]
        elif last and keep_last and not isinstance(part, int):
            out.append(part)
    return out


def _dotted(path: list) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


def describe_errors(e: ValidationError, data: Any, model_cls: type[BaseModel] | None = None,
                    tags: list[str] | None = None) -> str:
    """One sentence per wrong field: where (pass #N ('name'), field 'a.b'), what is wrong, what was given.

    ``tags`` lists the valid values of a tagged union (the pass names of a recipe) for 'unknown pass' errors.
    """
    grouped: dict[tuple[str, str], list[str]] = {}
    for err in e.errors():
        typ, msg = err["type"], err["msg"]
        full = _data_path(tuple(err["loc"]), data, keep_last=typ in ("missing", "extra_forbidden"))
        path, where = full, ""
        if len(path) >= 2 and path[0] == "passes" and isinstance(path[1], int):
            item = data["passes"][path[1]]
            name = item.get("pass") if isinstance(item, dict) else None
            where = f"pass #{path[1] + 1}" + (f" ('{name}')" if isinstance(name, str) else "")
            path = path[2:]
        field = _dotted(path)
        if typ in ("union_tag_invalid", "union_tag_not_found"):
            key = re.findall(r"'(\w+)'", str(err.get("ctx", {}).get("discriminator", "")))
            key = key[-1] if key else "type"
            expected = tags or re.findall(r"'([^']+)'", str(err.get("ctx", {}).get("expected_tags", "")))
            known = ", ".join(expected)
            got = err["input"].get(key) if isinstance(err.get("input"), dict) else None
            noun = "pass" if key == "pass" else key
            text = (f"unknown {noun} {got!r}; known {noun}{'es' if noun == 'pass' else 's'}: {known}"
                    if typ == "union_tag_invalid" else f"missing '{key}:' key (one of {known})")
            grouped.setdefault((where, field), []).append(text)
            continue
        if typ == "extra_forbidden":
            allowed = _allowed(model_cls, full[:-1], data)
            text = "unknown field" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
        elif typ == "missing":
            text = "required field is missing"
        elif typ == "value_error" and (m := re.match(r"Value error, ([\w.\[\]]+): (.*)", msg, re.S)):
            # a config validator: its message starts with the field it is about
            field = ".".join(x for x in (field, m.group(1)) if x) if not field.endswith(m.group(1)) else field
            text = m.group(2)
        else:
            got = err.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict | list) and got is not None else ""
            text = msg.removeprefix("Value error, ") + got_s
        grouped.setdefault((where, field), []).append(text)
    parts = []
    for (where, field), texts in grouped.items():
        head = ", ".join(x for x in (where, f"field '{field}'" if field else "") if x) or "top level"
        unique = list(dict.fromkeys(texts))
        parts.append(f"{head}: {' or '.join(unique) if len(unique) > 1 else unique[0]}")
    return "; ".join(parts)
