"""The CLI is generated from the configuration dataclasses.

A subcommand declares its *sections*: ``(name, dataclass)`` pairs such as
``("model", ModelConfig)``, ``("corpus", CorpusConfig)`` and its own options. Every field of
every section becomes one flag (``max_length`` -> ``--max-length``), with

* the field's type: ``int``/``float``/``str``; ``bool`` as ``--flag/--no-flag``; ``Literal``
  as choices; ``list``/``tuple`` of str/int/float as a comma-separated value
  (:func:`~lmeval_regions.parsing.csv_list`); ``X | None`` as X with default None;
* the field's default, shown in ``--help``;
* the field's docstring (the string literal under it) as the help text.

So every command that loads a model or reads a corpus takes the same flags with the same
defaults. ``--config FILE`` (YAML or JSON, ``{command, <section>: {field: value}}``) supplies
values; flags given on the command line override them. After parsing, each section is built
as its dataclass, whose ``__post_init__`` validates it; :func:`save_run_config` writes the
sections back as the YAML that ``--config`` reads, next to every artefact.

Why our own ~200 lines and not tyro/simple-parsing/jsonargparse: the flags must keep the
kebab-case, comma-list conventions users already script against, several sections share one
flat namespace across ~20 subcommands with hand-written descriptions and examples, and the
config file must be the same sectioned document the commands write; each library would impose
its own list syntax, nesting prefixes or config layout.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union

from ..errors import RegionsError, did_you_mean
from ..parsing import csv_list

Section = tuple[str, type]
SUPPRESSED_FIELD = "cli"  # metadata key: field(metadata={"cli": False}) keeps a field off the CLI


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``field -> docstring`` of a dataclass (the string literal under each field), over its
    bases too."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag(name: str, f: dataclasses.Field | None = None) -> str:
    """The option string of a field: ``--max-length`` for ``max_length``, or the field's
    ``metadata["flag"]`` (used where two sections would otherwise clash, e.g. the model's
    ``--dtype`` and the importance accumulator's ``--accumulator-dtype``)."""
    if f is not None and f.metadata.get("flag"):
        return "--" + f.metadata["flag"]
    return "--" + name.replace("_", "-")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar(tp: Any):
    """Converter of a scalar type for argparse (and for config-file values)."""
    if tp in (int, float, str):
        return tp
    if typing.get_origin(tp) is Literal:
        return str
    raise TypeError(f"unsupported config field type {tp!r}")


def _type_info(tp: Any) -> dict[str, Any]:
    """How one field is parsed: ``{"kind": "bool"|"list"|"scalar"|"dict", ...}``."""
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"kind": "bool", "optional": optional}
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else str
        return {"kind": "list", "item": _scalar(item), "tuple": origin is tuple,
                "optional": optional}
    if origin is dict or tp is dict:
        return {"kind": "dict", "optional": optional}
    if origin is Literal:
        return {"kind": "scalar", "convert": str, "choices": list(typing.get_args(tp)),
                "optional": optional}
    return {"kind": "scalar", "convert": _scalar(tp), "optional": optional}


def fields_of(cls: type) -> list[dataclasses.Field]:
    """The CLI fields of a config dataclass, with their types resolved."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get(SUPPRESSED_FIELD) is False or not f.init:
            continue
        f.type = hints[f.name]
        out.append(f)
    return out


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def convert(f: dataclasses.Field, value: Any, what: str) -> Any:
    """A value from the command line or a config file, as the field's type."""
    info = _type_info(f.type)
    if value is None:
        return None
    if info["kind"] == "bool":
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise RegionsError(f"{what}: '{value}' is not true/false")
    if info["kind"] == "list":
        items = csv_list(value, info["item"], what=what)
        return tuple(items) if info["tuple"] else items
    if info["kind"] == "dict":
        from ..parsing import key_values

        return key_values(value, what=what)
    try:
        out = info["convert"](value)
    except (TypeError, ValueError):
        raise RegionsError(f"{what}: '{value}' is not a valid {info['convert'].__name__}") from None
    if "choices" in info and out not in info["choices"]:
        raise RegionsError(f"{what}: '{out}' is not one of {info['choices']}."
                           + did_you_mean(str(out), [str(c) for c in info["choices"]]))
    return out


def add_sections(parser: argparse.ArgumentParser, sections: list[Section]) -> None:
    """Add one flag per field of every section (an argument group per section)."""
    seen: dict[str, str] = {}
    for name, cls in sections:
        title = "command options" if name == "args" else f"{name} options"
        group = parser.add_argument_group(f"{title} ({cls.__name__})")
        docs = field_docs(cls)
        for f in fields_of(cls):
            opt = flag(f.name, f)
            if opt in seen:
                raise TypeError(f"{opt} of {cls.__name__} clashes with section '{seen[opt]}'")
            seen[opt] = name
            info = _type_info(f.type)
            default = default_of(f)
            help_text = docs.get(f.name, "")
            positional = f.metadata.get("positional", False)
            kw: dict[str, Any] = {"dest": f"{name}.{f.name}", "default": argparse.SUPPRESS}
            if default is not dataclasses.MISSING and default not in ("", ()):
                help_text += f" (default: {_show(default)})"
            kw["help"] = help_text.replace("%", "%%")
            if info["kind"] == "bool":
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["metavar"] = f.metadata.get("metavar") or (
                    "{" + ",".join(map(str, info["choices"])) + "}" if "choices" in info
                    else "LIST" if info["kind"] == "list" else f.name.upper())
            if positional:
                kw.pop("dest")
                nargs = f.metadata.get("nargs")
                if nargs:
                    kw["nargs"] = nargs
                elif default is not dataclasses.MISSING:
                    kw["nargs"] = "?"
                group.add_argument(f"{name}.{f.name}", **kw)
            else:
                group.add_argument(flag(f.name, f), **kw)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A run config (YAML or JSON): ``{"command": ..., section: {field: value}}``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RegionsError(f"--config '{path}' is not a file")
    text = p.read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RegionsError(f"--config '{path}' is not valid "
                           f"{'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(doc, dict):
        raise RegionsError(f"--config '{path}' must hold a mapping of sections, got "
                           f"{type(doc).__name__}")
    return doc


def build_sections(sections: list[Section], ns: argparse.Namespace,
                   file_doc: dict[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """``section -> dataclass instance``: command-line values over config-file values over
    the dataclass defaults; each instance validates itself in ``__post_init__``."""
    given = vars(ns)
    file_doc = dict(file_doc or {})
    names = {n for n, _ in sections}
    unknown = sorted(set(file_doc) - names - {"command", "library_version"})
    if unknown:
        raise RegionsError(f"{source or 'config'}: unknown section(s) {unknown}; this command "
                           f"takes {sorted(names)}." + did_you_mean(unknown[0], names))
    out = {}
    for name, cls in sections:
        values = dict(file_doc.get(name) or {})
        fields = {f.name: f for f in fields_of(cls)}
        bad = sorted(set(values) - set(fields))
        if bad:
            raise RegionsError(f"{source or 'config'}: section '{name}' has unknown field(s) "
                               f"{bad}." + did_you_mean(bad[0], fields))
        kwargs = {k: convert(fields[k], v, f"{source or 'config'} {name}.{k}")
                  for k, v in values.items()}
        for fname, f in fields.items():
            key = f"{name}.{fname}"
            if key in given:
                kwargs[fname] = convert(f, given[key], flag(fname, f))
        missing = [flag(k, f) for k, f in fields.items()
                   if k not in kwargs and default_of(f) is dataclasses.MISSING]
        if missing:
            raise RegionsError(f"missing required option(s): {', '.join(missing)}")
        out[name] = cls(**kwargs)
    return out


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and paths as YAML/JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get(SUPPRESSED_FIELD) is not False}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_beside(path: str | Path) -> Path:
    """Where the run config of an output *file* goes: ``x.safetensors`` -> ``x.config.yaml``."""
    p = Path(path)
    return p.with_name(f"{p.name[: -len(p.suffix)] if p.suffix else p.name}.config.yaml")


def config_inside(folder: str | Path) -> Path:
    """Where the run config of an output *folder* goes: ``folder/config.yaml``."""
    return Path(folder) / "config.yaml"


def run_config(command: str, sections: dict[str, Any]) -> dict[str, Any]:
    """The document ``--config`` reads: ``{command, library_version, <section>: {...}}``."""
    from lmeval_regions import __version__

    return {"command": command, "library_version": __version__,
            **{name: to_plain(obj) for name, obj in sections.items()}}


def save_run_config(path: str | Path, command: str, sections: dict[str, Any]) -> Path:
    """Write :func:`run_config` as YAML, atomically."""
    import yaml

    from lmeval_regions.artefacts import write_text_atomic

    path = Path(path)
    write_text_atomic(path, yaml.safe_dump(run_config(command, sections), sort_keys=False,
                                           allow_unicode=True))
    return path
