"""Shared pydantic helpers: readable ValidationError messages and a finite-float check.

Every configuration file and protocol message in fediim (and in ``coordinator`` and
``simulations``) reports a pydantic :class:`~pydantic.ValidationError` the same way, one
problem per line::

    <source>: <dotted.location>: <message> (got <input>)

e.g. ``invalid run configuration: epsilon: must be finite (got inf)``. List items are shown
as ``key[i]``, pydantic's "Input should be ..." reads "expected ...", and a custom validator
may name a sub-key by starting its message with ``"[i]: "`` or ``"name: "`` (it is folded
into the location).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationError
from pydantic_core import ErrorDetails

__all__ = [
    "FiniteFloat",
    "error_lines",
    "finite",
    "format_validation_error",
    "join_errors",
]

# Longest repr of an offending value shown in a message (longer ones are cut).
_MAX_INPUT_REPR = 80

# pydantic tags union branches in ``loc`` ("function-after[...]", "tuple[float, float]", ...)
_UNION_TAGS = ("function-", "tuple[", "list[")
# "[3]: rest" or "column_name: rest" at the start of a custom validator's message
_SUB_KEY = re.compile(r"^(\[\d+\]|[A-Za-z0-9_.-]+): (.*)$", re.S)
_SAYS_GOT = re.compile(r"\bgot\b")


def finite(v: float) -> float:
    """Return ``v`` unchanged; ValueError("must be finite") if it is inf or NaN.

    For pydantic field validators (``AfterValidator(finite)``, or :data:`FiniteFloat`).
    """
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return v


#: A float that must be finite (use with ``Field(...)`` constraints such as ``gt=0``).
FiniteFloat = Annotated[float, AfterValidator(finite)]


def error_lines(
    exc: ValidationError,
    *,
    prefix: str = "",
    allowed_keys: Iterable[str] | None = None,
    rename: Callable[[str], str] | None = None,
    describe: Callable[[ErrorDetails], str | None] | None = None,
    show_input: bool = True,
) -> list[str]:
    """One ``"<dotted.location>: <message> (got <input>)"`` line per error in ``exc``.

    ``prefix`` is put in front of every location (e.g. ``columns."age"``); ``rename`` maps
    each key of the location (e.g. snake_case to kebab-case); ``allowed_keys`` is listed
    after "unknown key"; ``describe`` may return a better message for an error (None keeps
    the default). The offending value is shown (cut to 80 characters)
    unless ``show_input`` is False, the message already says "got", or it is a whole table.
    """
    allowed = list(allowed_keys) if allowed_keys is not None else None
    lines = []
    for err in exc.errors():
        kind = err["type"]
        loc: list[int | str] = list(err["loc"])
        msg = describe(err) if describe is not None else None
        folded = False
        if msg is None:
            msg = _default_message(err, allowed)
            m = _SUB_KEY.match(msg)
            if m and kind == "value_error":
                sub, msg = m.groups()
                loc.append(int(sub[1:-1]) if sub.startswith("[") else sub)
                folded = True  # the input is the parent's; the sub-key's message says more
        if (show_input and not folded and kind not in ("extra_forbidden", "missing")
                and "input" in err and not isinstance(err["input"], dict)
                and not _SAYS_GOT.search(msg)):
            msg += f" (got {_short_repr(err['input'])})"
        lines.append(f"{_location(loc, prefix, rename)}: {msg}")
    return lines


def join_errors(source: str, lines: Sequence[str], *, noun: str = "errors",
                multiline: bool = True) -> str:
    """``"<source>: <line>"`` for one problem; for several ``"<source>: <n> <noun>:"`` then the
    lines, indented one per line (``multiline``, for files a person reads) or joined by "; "
    (for log lines and protocol replies)."""
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    head = f"{source}: {len(lines)} {noun}:"
    if multiline:
        return head + "\n  " + "\n  ".join(lines)
    return f"{head} " + "; ".join(lines)


def format_validation_error(
    exc: ValidationError,
    source: str,
    *,
    noun: str = "errors",
    multiline: bool = True,
    allowed_keys: Iterable[str] | None = None,
    rename: Callable[[str], str] | None = None,
    show_input: bool = True,
) -> str:
    """The whole message: :func:`error_lines` of ``exc`` joined by :func:`join_errors`."""
    lines = error_lines(exc, allowed_keys=allowed_keys, rename=rename, show_input=show_input)
    return join_errors(source, lines, noun=noun, multiline=multiline)


def _default_message(err: ErrorDetails, allowed: list[str] | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key" + ("; expected only: " + ", ".join(allowed) if allowed else "")
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        msg = "expected " + msg.removeprefix("Input should be ")
    return msg


def _location(loc: Sequence[int | str], prefix: str,
              rename: Callable[[str], str] | None) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(_UNION_TAGS):
            continue
        else:
            key = rename(part) if rename is not None else part
            out += f".{key}" if out else key
    return out or "<top level>"


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_INPUT_REPR:
        text = text[: _MAX_INPUT_REPR - 3] + "..."
    return text
