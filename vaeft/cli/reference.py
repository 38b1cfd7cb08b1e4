"""The params reference (``docs/params.md``), generated from the typed schema in ``vaeft.config``.

Types and defaults come from the pydantic models, meanings from the comments and docstrings
beside each field, so the reference cannot drift from what ``vaeft params check`` accepts
(``tests/test_params_reference.py`` fails while the committed file is stale).
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vaeft.config import Params

_FIELD = re.compile(r"^    (\w+)\s*:")


def _comments(cls: type) -> dict[str, str]:
    """Each field's comment lines: those just above it and any on its own line."""
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m:
            inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[m.group(1)] = " ".join([*pending, inline]).strip()
        pending = []
    return out


def _type(t: typing.Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        base = _type(args[0])
        bounds = [f"{k} {getattr(m, k)}" for m in args[1:] for k in ("gt", "ge", "lt", "le")
                  if getattr(m, k, None) is not None]
        return f"{base} ({', '.join(bounds)})" if bounds else base
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    if t is type(None):
        return "null"
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return " \\| ".join(json.dumps(m.value) for m in t)
    return getattr(t, "__name__", str(t))


def _model_of(t: typing.Any) -> type[BaseModel] | None:
    for a in (t, *typing.get_args(t)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        inner = typing.get_args(a)
        if typing.get_origin(a) is list and inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            return inner[0]
    return None


def _value(v: typing.Any) -> str:
    from pydantic import TypeAdapter

    return "`" + json.dumps(TypeAdapter(typing.Any).dump_python(v, mode="json")).replace("|", "\\|") + "`"


def _rows(cls: type[BaseModel], prefix: str, instance: BaseModel | None, out: list[str]) -> None:
    notes = _comments(cls)
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        if instance is not None:
            default = getattr(instance, name)
        elif field.default is not PydanticUndefined:
            default = field.default
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = PydanticUndefined
        shown = "required" if default is PydanticUndefined else _value(default)
        sub = _model_of(field.annotation)
        meaning = notes.get(name, "") or (field.description or "")
        if sub is not None and not meaning and sub.__doc__:
            meaning = sub.__doc__.strip().split("\n\n")[0].replace("\n", " ")
        meaning = " ".join(meaning.split()).replace("|", "\\|")
        if sub is not None:
            is_list = typing.get_origin(field.annotation) is list
            out.append(f"| `{key}` | {_type(field.annotation)} | {shown if is_list or default is None else 'see below'} "
                       f"| {meaning} |")
            sub_instance = default if isinstance(default, BaseModel) else None
            _rows(sub, f"{key}[]." if is_list else f"{key}.", sub_instance, out)
        else:
            bounds = [f"{k} {getattr(m, k)}" for m in field.metadata for k in ("gt", "ge", "lt", "le")
                      if getattr(m, k, None) is not None]
            kind = _type(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
            out.append(f"| `{key}` | {kind} | {shown} | {meaning} |")


def params_reference() -> str:
    """The markdown reference of every params key: type, default (of the embedded default), meaning."""
    rows: list[str] = []
    _rows(Params, "", Params(), rows)
    return "\n".join([
        "# params reference",
        "",
        "Generated from the typed schema (`vaeft/config.py`) by `vaeft params reference --out docs/params.md`;",
        "do not edit by hand. A key left out of `params.yaml` takes the default shown. `list[...]` keys",
        "such as `data.sources` take a list; `key[].sub` are the keys of each item. Optional sections",
        "(`train.<phase>.gan`, `publish.s3`) default to `null` (off); their keys apply once set.",
        "`vaeft params show` prints a params file with every default filled in.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
