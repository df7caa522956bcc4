"""Parsing of the small text forms users type: comma lists, ``KEY=VALUE`` pairs, number lists,
counts with suffixes (``500k``, ``2M``).

One implementation each, used by the CLI generator, ``hf-regions`` model_args and the studies;
every error names the text and the expected form.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from .errors import RegionsError


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets: ``"a=w[:, 5],b"`` -> ``["a=w[:, 5]", "b"]``
    (entry specs and JSON values keep their commas)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def csv_list(text: "str | Iterable[Any] | None", convert: Callable[[str], Any] = str,
             what: str = "list") -> list[Any]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (items stripped, empties dropped), each passed through
    ``convert``; a list or tuple (from a YAML config) is converted item by item; None -> ``[]``."""
    if text is None:
        return []
    items = [str(t).strip() for t in text] if not isinstance(text, str) else \
        [t.strip() for t in split_top_level(text)]
    out: list[Any] = []
    for item in items:
        if not item:
            continue
        try:
            out.append(convert(item))
        except (TypeError, ValueError):
            name = getattr(convert, "__name__", "value")
            raise RegionsError(f"{what} '{text}': item '{item}' is not a valid {name} "
                               f"(expected comma-separated {name} values)") from None
    return out


def int_list(text: "str | Iterable[Any] | None", what: str = "list") -> list[int]:
    """Comma-separated integers, e.g. ``"1,3,5,10"``."""
    return csv_list(text, int, what)


def float_list(text: "str | Iterable[Any] | None", what: str = "list") -> list[float]:
    """Comma-separated numbers, e.g. ``"0.01,0.03"``."""
    return csv_list(text, float, what)


def pairs(text: "str | Iterable[str] | None", what: str = "list", form: str = "KEY=VALUE",
          example: str = "ar=imp.ar.safetensors") -> list[tuple[str, str]]:
    """``"a=x,b=y"`` -> ``[("a", "x"), ("b", "y")]`` in order (keys may repeat); ``form``
    names the expected shape in the error (e.g. ``LANG=FILE``)."""
    out: list[tuple[str, str]] = []
    for item in csv_list(text, what=what):
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise RegionsError(f"{what} item '{item}' is not {form} (e.g. {example})")
        out.append((key.strip(), value.strip()))
    return out


def typed_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"``/``"false"`` -> bool, ``"none"`` -> None, else
    the text (how ``KEY=VALUE`` model arguments are typed, as lm-eval's CLI does)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def key_values(text: "str | dict[str, Any] | None", what: str = "arguments") -> dict[str, Any]:
    """``"dtype=bfloat16,trust_remote_code=true"`` -> typed dict; a JSON object
    (``'{"text_path": "x.jsonl"}'``) is read as JSON; a dict passes through."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    if text.strip().startswith("{"):
        import json

        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise RegionsError(f"{what} '{text}' is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise RegionsError(f"{what} '{text}' must be a JSON object")
        return doc
    return {k: typed_value(v) for k, v in pairs(text, what=what, example="dtype=bfloat16")}



_SUFFIXES = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9, "t": 10 ** 12}


def count(text: "str | int", what: str = "count") -> int:
    """A positive whole count, with an optional decimal suffix: ``"500k"`` -> 500_000,
    ``"2M"`` -> 2_000_000, ``"1.5B"`` (or ``G``) -> 1_500_000_000, ``"1200"`` -> 1200;
    underscores are allowed (``"10_000"``). Suffixes are powers of 1000, case-insensitive."""
    from decimal import Decimal, InvalidOperation

    bad = RegionsError(f"{what} '{text}' is not a whole count >= 1 (expected a number with an "
                       "optional k/M/B suffix, e.g. 500k, 2M, 10000)")
    if isinstance(text, bool):
        raise bad
    s = str(text).strip().replace("_", "").lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kmbgt]?)", s)
    if m is None:
        raise bad
    try:  # Decimal: "1.5M" must be 1_500_000 exactly, not a float's 1499999.99...
        value = Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
    except InvalidOperation:
        raise bad from None
    if value != value.to_integral_value() or value < 1:
        raise bad
    return int(value)
