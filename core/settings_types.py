"""Value types of the settings registry, and TOML literals.

A :class:`ValueType` says how one setting's value is read from a TOML file (as
``tomllib`` parsed it) and from the text of an environment variable, and how it
is written back as a TOML literal (for the generated example file and docs).
The builtin types are ``str``, ``int``, ``float`` (finite only), ``bool``
(``true/false/1/0/yes/no`` in the environment) and ``list[str]`` (comma-separated
in the environment); :class:`ParsedType` wraps any parser ``str -> value``
(``Path``, ``ip_address``).  :func:`value_type` resolves what a
:class:`core.settings_registry.Setting` declares as its ``type``.

``from_toml``/``from_env`` raise ``ValueError`` (optionally with a short detail)
for a value that does not fit; :mod:`core.settings_registry` turns that into a
``ConfigError`` naming the key, where the value came from and the value.

Concurrency: everything here is pure and immutable after import; the type
instances are shared by every registry and thread.
"""

from __future__ import annotations

import abc
import math
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "BOOLEAN",
    "FLOAT",
    "INTEGER",
    "STRING",
    "STRING_LIST",
    "ParsedType",
    "ValueType",
    "shorten",
    "toml_literal",
    "toml_literal_or_repr",
    "toml_type_name",
    "value_type",
]

SHOWN_CHARS = 80
"""Longest shown value in a message; longer ones are cut with an ellipsis."""

# ---------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------


class ValueType(abc.ABC):
    """How a setting's value is read from TOML and from the environment, and written back.

    ``from_toml`` and ``from_env`` raise ``ValueError`` (optionally with a detail
    such as "must be finite") when the value does not fit; the registry turns
    that into a :class:`ConfigError` naming the key and the given value.
    """

    #: Human name used in messages and docs ("integer", "list of strings").
    name: str = "value"
    #: The Python annotation the model dataclass must declare for this type.
    annotation: Any = object
    #: Example literal for commented-out lines of the example TOML.
    placeholder: Any = ""

    @abc.abstractmethod
    def from_toml(self, value: object) -> Any:
        """Convert a value as parsed by tomllib."""

    @abc.abstractmethod
    def from_env(self, text: str) -> Any:
        """Convert the text of an environment variable."""

    def to_toml(self, value: Any) -> str:
        """Render *value* as a TOML literal that :meth:`from_toml` reads back unchanged."""
        return toml_literal(value)


class StrType(ValueType):
    name = "string"
    annotation = str

    def from_toml(self, value: object) -> str:
        if not isinstance(value, str):
            raise ValueError
        return value

    def from_env(self, text: str) -> str:
        return text


class IntType(ValueType):
    name = "integer"
    annotation = int
    placeholder = 0

    def from_toml(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value

    def from_env(self, text: str) -> int:
        return int(text.strip(), 10)


class FloatType(ValueType):
    name = "number"
    annotation = float
    placeholder = 0.0

    def from_toml(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError
        return self._finite(float(value))

    def from_env(self, text: str) -> float:
        return self._finite(float(text.strip()))

    @staticmethod
    def _finite(value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class BoolType(ValueType):
    name = "boolean"
    annotation = bool
    placeholder = False
    TRUE = frozenset({"true", "1", "yes"})
    FALSE = frozenset({"false", "0", "no"})

    def from_toml(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueError
        return value

    def from_env(self, text: str) -> bool:
        word = text.strip().lower()
        if word in self.TRUE:
            return True
        if word in self.FALSE:
            return False
        raise ValueError("use true/false, 1/0 or yes/no")


class StrListType(ValueType):
    name = "list of strings"
    annotation = list[str]
    placeholder: Any = []

    def from_toml(self, value: object) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError
        return list(value)

    def from_env(self, text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]


class ParsedType(ValueType):
    """A string in TOML and in the environment, converted by a parser (``Path``, ``ip_address``)."""

    def __init__(self, parser: Callable[[str], Any], name: str | None = None) -> None:
        self.parser = parser
        self.name = name if name is not None else str(getattr(parser, "__name__", "value"))
        if isinstance(parser, type):
            self.annotation = parser
        else:
            self.annotation = typing.get_type_hints(parser).get("return", object)

    def from_toml(self, value: object) -> Any:
        if not isinstance(value, str):
            raise ValueError
        return self.parser(value)

    def from_env(self, text: str) -> Any:
        return self.parser(text)

    def to_toml(self, value: Any) -> str:
        return toml_literal(str(value))


STRING = StrType()
INTEGER = IntType()
FLOAT = FloatType()
BOOLEAN = BoolType()
STRING_LIST = StrListType()

_BUILTIN_TYPES: dict[Any, ValueType] = {
    str: STRING,
    int: INTEGER,
    float: FLOAT,
    bool: BOOLEAN,
    list: STRING_LIST,
    list[str]: STRING_LIST,
}


def value_type(spec: Any) -> ValueType:
    """Resolve a ``Setting.type``: a builtin (str, int, float, bool, list[str]), a ValueType or a parser."""
    if isinstance(spec, ValueType):
        return spec
    try:
        return _BUILTIN_TYPES[spec]
    except (KeyError, TypeError):
        pass
    if callable(spec):
        return ParsedType(spec)
    raise TypeError(f"unsupported setting type {spec!r}")


# ---------------------------------------------------------------------------
# TOML literals
# ---------------------------------------------------------------------------

_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_literal(value: Any) -> str:
    """Render a str, int, float, bool or list of those as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot render non-finite float {value!r}")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def toml_type_name(value: object) -> str:
    """The TOML name of a value as ``tomllib`` parsed it ("string", "table", ...)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__  # dates and times


def shorten(text: str) -> str:
    """*text*, cut to :data:`SHOWN_CHARS` characters for a message."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def toml_literal_or_repr(value: object) -> str:
    """*value* as a TOML literal, or its ``repr`` when TOML cannot write it."""
    try:
        return toml_literal(value)
    except (TypeError, ValueError):
        return repr(value)
