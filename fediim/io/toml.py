"""The one TOML writer (values, keys and tables that ``tomllib`` reads back exactly) and the
one reader of fediim's TOML files.

fediim writes small TOML files (schemas, site configurations, the local app's run
configuration); they all go through :func:`toml_value` and :func:`toml_document` so that
every string is escaped the same way and every float round-trips.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["read_toml", "toml_document", "toml_key", "toml_string", "toml_value"]

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string literal for ``text`` (control characters escaped)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(name: str) -> str:
    """``name`` as a TOML key: bare where TOML allows it, quoted otherwise."""
    if name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
        return name
    return toml_string(name)


def toml_value(value: Any, *, integral_floats: bool = False) -> str:
    """A TOML literal for a bool, int, float, string or a list of those.

    Floats use the shortest repr that round-trips (``1.0``, ``1e-06``); with
    ``integral_floats`` a whole-number float is written as an integer (``120``), which reads
    back as an int that compares equal. NaN and infinities are refused: fediim's files
    never need them.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML value must be finite, got {value!r}")
        if integral_floats and value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v, integral_floats=integral_floats)
                               for v in value) + "]"
    raise TypeError(f"unsupported TOML value {value!r}")


def toml_document(tables: Mapping[str, Mapping[str, Any]], *, header: str = "") -> str:
    """A TOML document: ``tables`` maps a table name ("" = top level) to its keys.

    Keys whose value is None are left out. ``header`` lines are written as comments.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, entries in tables.items():
        if name:
            lines += ["", f"[{name}]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in entries.items()
                  if v is not None]
    return "\n".join(lines).lstrip("\n") + "\n"


def read_toml(path: str | os.PathLike[str], error: type[Exception], what: str) -> dict[str, Any]:
    """The TOML document at ``path``; any problem is ``error`` naming the file and ``what``
    it should have been (e.g. ``"schema file"``)."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"{source}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{source}: is a directory; expected a {what}") from None
    except OSError as exc:
        raise error(f"{source}: cannot read {what}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{source}: invalid TOML: expected UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{source}: invalid TOML: {exc}") from None
