"""What one config key accepts: `Rule` and its makers (Int, Float, Bool, Text, OneOf, Each, Nullable, Importable).

The schema (gcode_exp/config.py SCHEMA) and each model class (`Model.rules`, for the keys it brings) state
their keys with these, so a refusal reads the same wherever the key is declared: `must be <what>`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What one key accepts: `ok(value)`, described by `what` in the message (`must be <what>`).

    `only_if="model.name=multihead"`: the key is needed only then; elsewhere it is ignored, so
    setting it is warned about. `optional`: the key may be absent (a group that adds it)."""

    what: str
    ok: Callable[[Any], bool]
    only_if: str | None = None
    optional: bool = False


def is_int(v: Any) -> bool:
    """A whole number, not a bool (YAML's `true` is an int to Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite number, not a bool: nan and inf are refused."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range(ge=None, gt=None, le=None, lt=None) -> tuple[str, Callable[[Any], bool]]:
    lo, lo_open = (gt, True) if gt is not None else (ge, False)
    hi, hi_open = (lt, True) if lt is not None else (le, False)
    if lo is not None and hi is not None:
        text = f"between {lo} and {hi}" if not (lo_open or hi_open) else \
            f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        text = f"{'<' if hi_open else '<='} {hi}"
    else:
        text = ""

    def inside(v) -> bool:
        return ((lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))

    return text, inside


def _note(what: str, note: str | None) -> str:
    return f"{what} ({note})" if note else what


def Int(ge=None, le=None, note: str | None = None, **kw) -> Rule:
    text, inside = _range(ge=ge, le=le)
    return Rule(_note(f"a whole number {text}".strip(), note), lambda v: is_int(v) and inside(v), **kw)


def Float(ge=None, gt=None, le=None, lt=None, note: str | None = None, **kw) -> Rule:
    """A finite number (nan and inf are refused); a closed range reads `between 0 and 1`."""
    text, inside = _range(ge=ge, gt=gt, le=le, lt=lt)
    what = text if text.startswith("between") else f"a number {text}".strip()
    return Rule(_note(what, note), lambda v: is_number(v) and inside(v), **kw)


def Bool(**kw) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), **kw)


def Text(**kw) -> Rule:
    """A non-empty name or path (a number such as `name=123` is fine too)."""
    return Rule("a non-empty text", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)
                and str(v) != "", **kw)


def OneOf(*choices: str, **kw) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices, **kw)


def Each(rule: Rule, **kw) -> Rule:
    """A list (possibly empty) whose every item is `rule`'s."""
    return Rule(f"a list, each item {rule.what}", lambda v: isinstance(v, list) and all(rule.ok(x) for x in v), **kw)


def Nullable(rule: Rule) -> Rule:
    """`rule`, or null."""
    return Rule(f"{rule.what} or null", lambda v: v is None or rule.ok(v), rule.only_if, rule.optional)


def named_class(path: Any, base: str) -> type | None:
    """The class `path` names if it imports and subclasses gcode_exp's `base` ("module:Class"), else None."""
    import importlib

    from hydra.utils import get_class

    module, _, name = base.partition(":")
    hydra_log = logging.getLogger("hydra.utils")  # it logs a failed import at ERROR: our refusal is the one line
    was, hydra_log.disabled = hydra_log.disabled, True
    try:
        cls = get_class(str(path))
    except Exception:
        return None
    finally:
        hydra_log.disabled = was
    return cls if isinstance(cls, type) and issubclass(cls, getattr(importlib.import_module(module), name)) else None


def Importable(base: str, what: str, **kw) -> Rule:
    """A `_target_`: the dotted path of a class that imports and subclasses `base`."""
    return Rule(what, lambda v: named_class(v, base) is not None, **kw)
