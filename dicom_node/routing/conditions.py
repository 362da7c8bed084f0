"""One condition of a rule's ``match`` table, and its test against one value.

A condition is what the configuration contract allows (extended, never renamed):

- a string: a glob (``"CT_*"``, ``?`` and ``[...]`` as in shell patterns, case-insensitive, the
  whole value), or a ``/regular expression/`` (Python ``re.search``, case-sensitive; ``/.../i``
  for case-insensitive);
- a number or a boolean: equality (``image_count = 1``, ``eligible = true``);
- a list: one of (each element a string, number or boolean as above);
- a table: ``{min = 1, max = 3}`` a numeric range (inclusive, either bound optional), or
  ``{present = true}`` / ``{present = false}``.

Multi-valued DICOM attributes (``ImageType = ORIGINAL\\PRIMARY\\AXIAL``) match when the whole
backslash-joined value or any single value matches. A missing attribute fails every condition
except ``{present = false}``.
"""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Any

Scalar = str | int | float | bool


class ConditionError(ValueError):
    """A condition that cannot be used (bad regular expression, empty list, unknown table key)."""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str  # a sentence naming the key, the value seen and the condition


@functools.lru_cache(maxsize=1024)
def _regex(text: str) -> re.Pattern | None:
    """The compiled pattern of a ``/.../`` or ``/.../i`` string, None for a glob."""
    if len(text) >= 2 and text.startswith("/"):
        if text.endswith("/") and len(text) > 2:
            body, flags = text[1:-1], 0
        elif text.endswith("/i") and len(text) > 3:
            body, flags = text[1:-2], re.IGNORECASE
        else:
            return None
        try:
            return re.compile(body, flags)
        except re.error as exc:
            raise ConditionError(f"regular expression {text!r} is invalid: {exc}") from exc
    return None


def check(condition: Any) -> Any:
    """Validate a condition (raises ``ConditionError`` with a sentence); returns it unchanged."""
    if isinstance(condition, bool) or isinstance(condition, (int, float)):
        return condition
    if isinstance(condition, str):
        _regex(condition)
        return condition
    if isinstance(condition, list):
        if not condition:
            raise ConditionError("an empty list matches nothing; give at least one value")
        for c in condition:
            if not isinstance(c, (str, int, float, bool)):
                raise ConditionError(f"a list holds strings or numbers, not {c!r}")
            check(c)
        return condition
    if isinstance(condition, dict):
        keys = set(condition)
        if keys == {"present"}:
            if not isinstance(condition["present"], bool):
                raise ConditionError(f"present must be true or false, got {condition['present']!r}")
            return condition
        if keys and keys <= {"min", "max"}:
            for k in keys:
                v = condition[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConditionError(f"{k} must be a number, got {v!r}")
            if "min" in keys and "max" in keys and condition["min"] > condition["max"]:
                raise ConditionError(f"min {condition['min']} is greater than max {condition['max']}")
            return condition
        raise ConditionError(f"a table condition is {{min=, max=}} or {{present=}}, got keys {sorted(keys)}")
    raise ConditionError(f"a condition is a string, number, boolean, list or table, got {condition!r}")


def describe(condition: Any) -> str:
    if isinstance(condition, dict):
        if "present" in condition:
            return "present" if condition["present"] else "absent"
        lo, hi = condition.get("min"), condition.get("max")
        if lo is not None and hi is not None:
            return f"between {lo} and {hi}"
        return f">= {lo}" if lo is not None else f"<= {hi}"
    if isinstance(condition, list):
        return "one of " + ", ".join(repr(c) for c in condition)
    return repr(condition)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _values(value: Any) -> list[str]:
    """The whole value and, for a multi-valued one, each of its values, as strings."""
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
        return ["\\".join(parts), *parts]
    text = str(value)
    return [text, *text.split("\\")] if "\\" in text else [text]


def _scalar_matches(condition: Scalar, value: Any) -> bool:
    if isinstance(condition, bool):
        return isinstance(value, bool) and value is condition or str(value).lower() == str(condition).lower()
    if isinstance(condition, (int, float)):
        n = _number(value)
        return n is not None and n == float(condition)
    pattern = _regex(condition)
    for v in _values(value):
        if pattern is not None:
            if pattern.search(v):
                return True
        elif fnmatch.fnmatchcase(v.strip().upper(), condition.strip().upper()):
            return True
    return False


def test(key: str, condition: Any, value: Any) -> Outcome:
    """Whether ``value`` (None: absent) satisfies ``condition``, with the reason either way."""
    if isinstance(condition, dict) and "present" in condition:
        present = value is not None and value != ""
        ok = present is condition["present"]
        return Outcome(ok, f"{key} is {'present' if present else 'absent'}"
                           f"{'' if ok else ', wanted ' + describe(condition)}")
    if value is None or value == "":
        return Outcome(False, f"{key} is absent, wanted {describe(condition)}")
    shown = value if not isinstance(value, str) or len(value) <= 64 else value[:61] + "..."
    if isinstance(condition, dict):
        n = _number(value)
        ok = n is not None and (condition.get("min") is None or n >= condition["min"]) and (
            condition.get("max") is None or n <= condition["max"])
    elif isinstance(condition, list):
        ok = any(_scalar_matches(c, value) for c in condition)
    else:
        ok = _scalar_matches(condition, value)
    return Outcome(ok, f"{key} {shown!r} {'matches' if ok else 'does not match'} {describe(condition)}")
