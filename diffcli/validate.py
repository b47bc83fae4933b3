"""Typed checks for values read from files: each field has a type, a range or an enumeration.

Every reader of a file that may come from elsewhere checks what it read with these helpers before it
builds anything or sizes memory from it: model files and training state (checkpoint.py, with the
field lists next to their classes: ModelConfig.FIELDS, SCHEDULE_FIELDS), the data cache (data.py) and
PNG text (images.py). Readers still to come (captions, imported autoencoders and text encoders, tuned
entries) plug in the same way: a tuple of `field(...)` specs next to the config class they fill,
`check_record` on the parsed JSON, and the reader turns `Invalid` into an InputError naming the file.

The first disagreement is reported, by its dotted name, with what was expected and what was found:
    model_config.depth must be an integer in [1, 1024], found -3
A value from a user's option that fails the same spec is a usage error, so Invalid is a UsageError;
file readers catch it and raise InputError (exit code 4) with the file's path in front.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from diffcli.errors import UsageError

_MISSING: Any = object()


class Invalid(UsageError):
    """A value that fails its spec; the message names the field (dotted path) and the value found."""


def describe(value: Any, limit: int = 40) -> str:
    """A short, one-line rendering of a found value: -3, "abc", NaN, [8, 8], a list of 300 items."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    if len(text) <= limit:
        return text
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'s' if len(value) != 1 else ''}"
    return text[: limit - 3] + "..."


def _number(n: float) -> str:
    return str(int(n)) if isinstance(n, int) or (isinstance(n, float) and n.is_integer() and abs(n) < 1e15) else f"{n:g}"


@dataclass(frozen=True)
class Field:
    """One field of a record: its type (int, float, bool or str) and what values it may take.
    int means a JSON integer (not a bool, not 2.0); float accepts integers too, never NaN or infinity."""

    name: str
    type: type
    min: float | None = None  # inclusive bounds
    max: float | None = None
    gt: float | None = None  # exclusive bounds
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    max_len: int = 256  # strings
    default: Any = _MISSING  # a field with a default may be absent

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def expectation(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        kind = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[self.type]
        if self.type is str:
            return f"{kind} of at most {self.max_len} characters"
        lo = f"[{_number(self.min)}" if self.min is not None else (f"({_number(self.gt)}" if self.gt is not None else None)
        hi = f"{_number(self.max)}]" if self.max is not None else (f"{_number(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            return f"{kind} in {lo}, {hi}"
        if lo:
            return f"{kind} {'>=' if self.min is not None else '>'} {lo[1:]}"
        if hi:
            return f"{kind} {'<=' if self.max is not None else '<'} {hi[:-1]}"
        return kind

    def check(self, value: Any, where: str = "") -> Any:
        """The value if it fits the spec, else Invalid('<where>.<name> must be ..., found ...')."""
        if not self._fits(value):
            raise Invalid(f"{join(where, self.name)} must be {self.expectation()}, found {describe(value)}")
        return float(value) if self.type is float else value

    def _fits(self, v: Any) -> bool:
        if self.type is bool:
            ok = isinstance(v, bool)
        elif self.type is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif self.type is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = isinstance(v, str) and len(v) <= self.max_len
        if not ok:
            return False
        if self.choices is not None:
            return any(v == c and type(v) is type(c) for c in self.choices)
        if self.type in (int, float):
            return ((self.min is None or v >= self.min) and (self.max is None or v <= self.max)
                    and (self.gt is None or v > self.gt) and (self.lt is None or v < self.lt))
        return True


def field(name: str, type_: type, *, min: float | None = None, max: float | None = None, gt: float | None = None,
          lt: float | None = None, choices: Iterable[Any] | None = None, max_len: int = 256,
          default: Any = _MISSING) -> Field:
    """field('depth', int, min=1, max=1024): a spec for check_record."""
    return Field(name, type_, min, max, gt, lt, tuple(choices) if choices is not None else None, max_len, default)


def join(where: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{where}[{name}]"
    return f"{where}.{name}" if where else name


def check_record(d: Any, fields: Iterable[Field], where: str, extra: bool = False) -> dict[str, Any]:
    """Check a parsed JSON object against field specs, in the specs' order: the checked values (with
    defaults filled in). Unknown keys are refused unless extra=True (then they are dropped)."""
    fields = tuple(fields)
    if not isinstance(d, dict):
        raise Invalid(f"{where} must be an object, found {describe(d)}")
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in d:
            out[f.name] = f.check(d[f.name], where)
        elif f.required:
            raise Invalid(f"{join(where, f.name)} is missing")
        else:
            out[f.name] = f.default
    if not extra:
        known = {f.name for f in fields}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise Invalid(f"{join(where, unknown[0])} is not a known field (known: {', '.join(sorted(known))})")
    return out


def check_scalars(d: Any, where: str, max_len: int = 4096, max_items: int = 256) -> dict[str, Any]:
    """A free-form JSON object of scalars (a training summary, a saved option list): strings of at
    most max_len characters, finite numbers, booleans and nulls only."""
    if not isinstance(d, dict):
        raise Invalid(f"{where} must be an object, found {describe(d)}")
    if len(d) > max_items:
        raise Invalid(f"{where} has {len(d)} entries, at most {max_items} are allowed")
    for k, v in d.items():
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            if not math.isfinite(v):
                raise Invalid(f"{join(where, k)} must be a finite number, found {describe(v)}")
        elif isinstance(v, str):
            if len(v) > max_len:
                raise Invalid(f"{join(where, k)} is {len(v)} characters long, at most {max_len} are allowed")
        else:
            raise Invalid(f"{join(where, k)} must be a string, number, true, false or null, found {describe(v)}")
    return d


def check_names(v: Any, where: str, count: int | None = None, max_len: int = 255) -> list[str]:
    """A list of distinct names (class names): non-empty strings of at most max_len characters without
    control characters or slashes (they end up in file names and on the terminal)."""
    if not isinstance(v, list):
        raise Invalid(f"{where} must be a list of strings, found {describe(v)}")
    if count is not None and len(v) != count:
        raise Invalid(f"{where} has {len(v)} names, the model config has {count} classes")
    seen: set[str] = set()
    for i, name in enumerate(v):
        if not isinstance(name, str) or not 1 <= len(name) <= max_len:
            raise Invalid(f"{join(where, i)} must be a string of 1 to {max_len} characters, found {describe(name)}")
        if any(ord(c) < 32 or ord(c) == 127 for c in name) or "/" in name:
            raise Invalid(f"{join(where, i)} holds a control character or a slash: {describe(name)}")
        if name in seen:
            raise Invalid(f"{join(where, i)} repeats the name {describe(name)}")
        seen.add(name)
    return v


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads with every failure (bad syntax, bad UTF-8, nesting deep enough to exhaust the stack,
    integers too long to convert) as Invalid. NaN and Infinity tokens parse; field checks refuse them."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Invalid(f"{where} is not valid JSON") from None
