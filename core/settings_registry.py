"""Declarative settings registry: a TOML file plus environment overrides -> frozen, typed settings.

A component (cdc daemon, relay, device agent) declares its settings once, as
:class:`Setting` objects grouped into :class:`Section` objects, each section
bound to a frozen dataclass that gives typed attribute access
(``settings.postgres.dsn``).  The :class:`Registry` then

* loads a TOML file (``tomllib``) and the environment into an instance of the
  component's top-level frozen dataclass;
* renders the settings as Markdown tables (for the docs) and as a commented
  example TOML file with every setting and its default.

Precedence, lowest first: the setting's default, the TOML file, the environment.

Environment variables: every setting can be set as ``FIELDSYNC_<SECTION>_<KEY>``
in upper case (``FIELDSYNC_POSTGRES_PASSWORD``); a setting may name one extra
alias (``Setting.env``), used only when the canonical variable is absent.
Values are parsed from text: booleans accept ``true/false/1/0/yes/no`` (any
case), lists are comma-separated (blank items dropped), and for a setting whose
default is ``None`` an empty value means "not set".  The environment is shared
by several components, so a ``FIELDSYNC_<SECTION>_*`` variable that names no
setting of a known section only logs a warning; other variables are ignored.

Errors: every problem raises :class:`cdc.errors.ConfigError` whose message
names where the value came from (file path or environment variable), the key
(``section.key``), what was expected and what was given.  Unknown sections and
keys get a "did you mean" hint (``difflib``).  The value of a secret setting
(``secret=True``) is never echoed; a setting may also carry a ``redact``
function that masks part of its value (e.g. the password inside a DSN), used
for :meth:`Registry.redact` and in its own error messages.

Definition errors (a default of the wrong type, a model dataclass whose fields
do not match the settings) are programming errors and raise ``TypeError`` or
``ValueError`` when the registry is built, i.e. at import time.

Concurrency: registries and loaded settings are immutable and may be shared
between threads.  Loading does file I/O only in :meth:`Registry.load`; the
rendering functions are pure.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import difflib
import logging
import math
import os
import re
import stat
import textwrap
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from core.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "FIELDSYNC"
MASK = "***"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_SHOWN_CHARS = 80

M = TypeVar("M")

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


def _toml_type_name(value: object) -> str:
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


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


# ---------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting.

    ``type`` is ``str``, ``int``, ``float``, ``bool``, ``list[str]`` (or ``list``), a
    :class:`ValueType`, or a parser ``str -> value`` (the TOML value is then a
    string).  A setting whose ``default`` is ``None`` is optional: absent means
    ``None``.  ``check`` validates a converted value and raises ``ValueError``
    with a short reason ("must be > 0").  ``env`` names an extra environment
    variable accepted when the canonical ``FIELDSYNC_<SECTION>_<KEY>`` is absent.
    ``redact`` masks part of a value for logs and messages (used when not
    ``secret``; a secret is always shown as ``***``).  ``example`` is shown,
    commented out, in the example TOML for optional settings.
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: Sequence[Any] | None = None
    secret: bool = False
    env: str | None = None
    check: Callable[[Any], None] | None = None
    redact: Callable[[Any], Any] | None = None
    example: Any = None
    value_type: ValueType = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"setting name {self.name!r} must match {_NAME_RE.pattern}")
        object.__setattr__(self, "value_type", value_type(self.type))
        if self.choices is not None and not self.choices:
            raise ValueError(f"setting {self.name!r}: choices must not be empty")
        if self.default is not None:
            problem = self.problem(self.default)
            if problem is not None:
                raise ValueError(f"setting {self.name!r}: default {self.default!r} {problem}")

    @property
    def optional(self) -> bool:
        """True when the setting may be unset (its default is None)."""
        return self.default is None

    @property
    def annotation(self) -> Any:
        """The annotation the section's dataclass must declare for this setting."""
        base = self.value_type.annotation
        return base | None if self.optional else base

    def problem(self, value: Any) -> str | None:
        """Why a converted *value* is not acceptable (choices, check), or None."""
        if self.choices is not None and value not in self.choices:
            listed = ", ".join(self.value_type.to_toml(c) for c in self.choices)
            hint = ""
            if isinstance(value, str) and not self.secret:
                words = [c for c in self.choices if isinstance(c, str)]
                hint = _did_you_mean(value, words, '"{}"')
            return f"is not one of: {listed}{hint}"
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as exc:
                return str(exc) or "is not valid"
        return None

    def show(self, value: Any) -> str:
        """The value as it may appear in logs and messages."""
        if self.secret:
            return "(value hidden)"
        if self.redact is not None:
            value = self.redact(value)
        return _shorten(repr(value))

    def redacted(self, value: Any) -> Any:
        """The value with secrets masked, for logging (None stays None)."""
        if value is None:
            return None
        if self.secret:
            return MASK
        if self.redact is not None:
            return self.redact(value)
        return copy.deepcopy(value)

    def default_value(self) -> Any:
        """A fresh copy of the default (lists are not shared between loads)."""
        return copy.deepcopy(self.default)


@dataclasses.dataclass(frozen=True)
class Section:
    """A group of settings (a TOML table), bound to a frozen dataclass ``model``.

    ``model`` must be a frozen dataclass with exactly one field per setting,
    annotated with the setting's type (``str | None`` for optional settings).
    ``check`` receives the built model and raises ``ValueError`` for problems
    that involve several keys; its message must name them.
    """

    name: str
    model: type[Any]
    settings: tuple[Setting, ...]
    help: str = ""
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"section name {self.name!r} must match {_NAME_RE.pattern}")
        object.__setattr__(self, "settings", tuple(self.settings))
        names = [s.name for s in self.settings]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"section [{self.name}]: duplicate settings {duplicates}")
        _check_model(self.model, {s.name: s.annotation for s in self.settings}, f"[{self.name}]")

    def get(self, key: str) -> Setting | None:
        for setting in self.settings:
            if setting.name == key:
                return setting
        return None

    @property
    def keys(self) -> list[str]:
        return [s.name for s in self.settings]


def _check_model(model: type[Any], expected: Mapping[str, Any], what: str) -> None:
    params = getattr(model, "__dataclass_params__", None)
    if not dataclasses.is_dataclass(model) or params is None or not params.frozen:
        raise TypeError(f"{what}: model {model!r} must be a frozen dataclass")
    hints = typing.get_type_hints(model)
    fields = [f.name for f in dataclasses.fields(model)]
    if sorted(fields) != sorted(expected):
        raise TypeError(
            f"{what}: model {model.__name__} fields {sorted(fields)} "
            f"do not match the settings {sorted(expected)}"
        )
    for name, annotation in expected.items():
        if hints[name] != annotation:
            raise TypeError(
                f"{what}: {model.__name__}.{name} is annotated {hints[name]!r}, "
                f"the setting needs {annotation!r}"
            )


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


def _did_you_mean(word: str, candidates: Iterable[str], fmt: str = "{}") -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not match:
        lowered = {c.lower(): c for c in candidates}
        if word.lower() in lowered:
            match = [lowered[word.lower()]]
    return f"; did you mean {fmt.format(match[0])}?" if match else ""


class Registry(Generic[M]):
    """The settings of one component, bound to its top-level frozen dataclass ``model``.

    ``model`` has one field per section, named like the section and annotated
    with the section's model.  ``check`` receives the built settings and raises
    ``ValueError`` for problems that span sections.
    """

    def __init__(
        self,
        component: str,
        model: type[M],
        sections: Sequence[Section],
        *,
        env_prefix: str = ENV_PREFIX,
        check: Callable[[M], None] | None = None,
    ) -> None:
        self.component = component
        self.model = model
        self.env_prefix = env_prefix
        self.check = check
        self.sections: dict[str, Section] = {}
        for section in sections:
            if section.name in self.sections:
                raise ValueError(f"duplicate section [{section.name}]")
            self.sections[section.name] = section
        _check_model(model, {s.name: s.model for s in sections}, f"registry {component!r}")
        self._env: dict[str, tuple[Section, Setting]] = {}
        for section in sections:
            for setting in section.settings:
                for var in self.env_vars(section.name, setting.name):
                    if var in self._env:
                        other_section, other = self._env[var]
                        raise ValueError(
                            f"environment variable {var} used by both {other_section.name}.{other.name} "
                            f"and {section.name}.{setting.name}"
                        )
                    self._env[var] = (section, setting)

    # -- names ---------------------------------------------------------------

    def env_var(self, section: str, key: str) -> str:
        """The canonical environment variable of ``section.key``: ``FIELDSYNC_SECTION_KEY``."""
        return f"{self.env_prefix}_{section.upper()}_{key.upper()}"

    def env_vars(self, section: str, key: str) -> list[str]:
        """The canonical variable, then the setting's alias if it has one."""
        names = [self.env_var(section, key)]
        alias = self.setting(section, key).env
        if alias and alias not in names:
            names.append(alias)
        return names

    def setting(self, section: str, key: str) -> Setting:
        found = self.sections[section].get(key)
        if found is None:
            raise KeyError(f"{section}.{key}")
        return found

    # -- loading -------------------------------------------------------------

    def load(self, path: str | Path | None, environ: Mapping[str, str] | None = None) -> M:
        """Defaults, then the TOML file at *path* (if not None), then *environ* (default os.environ)."""
        if path is None:
            return self.load_data({}, source="(no file)", environ=environ)
        path = Path(path)
        data = _read_toml(path)
        self._warn_readable_secrets(path, data)
        return self.load_data(data, source=str(path), environ=environ)

    def defaults(self) -> M:
        """The settings with every default (no file, empty environment)."""
        return self.load_data({}, source="(defaults)", environ={})

    def load_data(
        self, data: Mapping[str, Any], *, source: str, environ: Mapping[str, str] | None = None
    ) -> M:
        """Like :meth:`load`, from already parsed TOML *data*; *source* names it in messages."""
        environ = os.environ if environ is None else environ
        values: dict[str, dict[str, Any]] = {name: {} for name in self.sections}
        for section_name, table in data.items():
            section = self._section_of(section_name, table, source)
            for key, raw in table.items():
                setting = self._setting_of(section, key, source)
                values[section.name][key] = self._from_toml(section, setting, raw, source)
        env_used = self._apply_env(values, environ)
        where = source if not env_used else f"{source} + environment ({', '.join(env_used)})"
        built: dict[str, Any] = {}
        for section in self.sections.values():
            kwargs = {
                s.name: values[section.name].get(s.name, s.default_value())
                for s in section.settings
            }
            built[section.name] = obj = section.model(**kwargs)
            if section.check is not None:
                try:
                    section.check(obj)
                except ValueError as exc:
                    raise ConfigError(f"{where}: {exc}") from exc
        result = self.model(**built)
        if self.check is not None:
            try:
                self.check(result)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        return result

    def _section_of(self, name: str, table: object, source: str) -> Section:
        section = self.sections.get(name)
        if section is not None and isinstance(table, dict):
            return section
        valid = ", ".join(f"[{n}]" for n in self.sections)
        if section is not None:
            raise ConfigError(
                f"{source}: [{name}] must be a table (a section of settings), "
                f"got {_toml_type_name(table)}"
            )
        if not isinstance(table, dict):
            owners = [s.name for s in self.sections.values() if s.get(name) is not None]
            hint = f"; put it under [{owners[0]}]" if owners else ""
            raise ConfigError(
                f"{source}: top-level key {name!r} is not allowed, settings belong in a section "
                f"({valid}){hint}"
            )
        hint = _did_you_mean(name, self.sections, "[{}]")
        raise ConfigError(f"{source}: unknown section [{name}]{hint} (valid sections: {valid})")

    def _setting_of(self, section: Section, key: str, source: str) -> Setting:
        setting = section.get(key)
        if setting is not None:
            return setting
        hint = _did_you_mean(key, section.keys, section.name + ".{}")
        if not hint:
            owners = [s.name for s in self.sections.values() if s.get(key) is not None]
            if owners:
                hint = f"; {key} belongs in [{owners[0]}]"
        raise ConfigError(
            f"{source}: unknown setting {section.name}.{key}{hint} "
            f"(valid keys in [{section.name}]: {', '.join(section.keys)})"
        )

    def _from_toml(self, section: Section, setting: Setting, raw: object, source: str) -> Any:
        key = f"{section.name}.{setting.name}"
        try:
            value = setting.value_type.from_toml(raw)
        except ValueError as exc:
            shown = "(value hidden)" if setting.secret else _shorten(toml_literal_or_repr(raw))
            detail = f" ({exc})" if str(exc) and not setting.secret else ""
            raise ConfigError(
                f"{source}: {key}: expected {setting.value_type.name}, "
                f"got {_toml_type_name(raw)} {shown}{detail}"
            ) from None
        problem = setting.problem(value)
        if problem is not None:
            raise ConfigError(f"{source}: {key}: {setting.show(value)} {problem}")
        return value

    def _apply_env(
        self, values: dict[str, dict[str, Any]], environ: Mapping[str, str]
    ) -> list[str]:
        used: list[str] = []
        for section in self.sections.values():
            for setting in section.settings:
                for var in self.env_vars(section.name, setting.name):
                    if var in environ:
                        values[section.name][setting.name] = self._from_env(
                            section, setting, var, environ[var]
                        )
                        used.append(var)
                        break
        self._warn_unknown_env(environ)
        return used

    def _from_env(self, section: Section, setting: Setting, var: str, text: str) -> Any:
        where = f"environment variable {var} ({section.name}.{setting.name})"
        if setting.optional and not text.strip():
            return None
        try:
            value = setting.value_type.from_env(text)
        except ValueError as exc:
            shown = "(value hidden)" if setting.secret else _shorten(repr(text))
            detail = f" ({exc})" if str(exc) and not setting.secret else ""
            raise ConfigError(
                f"{where}: expected {setting.value_type.name}, got {shown}{detail}"
            ) from None
        problem = setting.problem(value)
        if problem is not None:
            raise ConfigError(f"{where}: {setting.show(value)} {problem}")
        return value

    def _warn_unknown_env(self, environ: Mapping[str, str]) -> None:
        prefixes = {f"{self.env_prefix}_{name.upper()}_": name for name in self.sections}
        for var in environ:
            if var in self._env:
                continue
            for prefix, section_name in prefixes.items():
                if var.startswith(prefix):
                    known = [
                        self.env_var(section_name, k) for k in self.sections[section_name].keys
                    ]
                    log.warning(
                        "environment variable %s names no %s setting of [%s]%s",
                        var,
                        self.component,
                        section_name,
                        _did_you_mean(var, known),
                    )
                    break

    def _warn_readable_secrets(self, path: Path, data: Mapping[str, Any]) -> None:
        secrets = [
            f"{name}.{key}"
            for name, table in data.items()
            if isinstance(table, dict) and name in self.sections
            for key in table
            if (s := self.sections[name].get(key)) is not None and s.secret
        ]
        if not secrets:
            return
        try:
            mode = path.stat().st_mode
        except OSError:
            return
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            log.warning(
                "%s holds secrets (%s) and is readable by every user; "
                "chmod 640 it or set them in the environment (%s)",
                path,
                ", ".join(secrets),
                ", ".join(self.env_var(*k.split(".", 1)) for k in secrets),
            )

    # -- output --------------------------------------------------------------

    def redact(self, settings: M) -> dict[str, dict[str, Any]]:
        """Every setting as plain data, secrets masked as ``***`` (unset ones stay None)."""
        return {
            section.name: {
                s.name: s.redacted(getattr(getattr(settings, section.name), s.name))
                for s in section.settings
            }
            for section in self.sections.values()
        }


def toml_literal_or_repr(value: object) -> str:
    try:
        return toml_literal(value)
    except (TypeError, ValueError):
        return repr(value)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from exc
    except PermissionError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: permission denied") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default_text(setting: Setting) -> str:
    if setting.default is None:
        return "unset"
    return f"`{setting.value_type.to_toml(setting.default)}`"


def _describe(setting: Setting) -> str:
    parts = [setting.help.strip()]
    if setting.choices is not None:
        parts.append(
            "One of "
            + ", ".join(f"`{setting.value_type.to_toml(c)}`" for c in setting.choices)
            + "."
        )
    if setting.secret:
        parts.append("**Secret**: never logged; prefer the environment variable.")
    return " ".join(parts)


def render_markdown(registry: Registry[Any], *, heading_level: int = 3) -> str:
    """Every section of *registry* as a heading, its help and a Markdown table of its settings."""
    hashes = "#" * heading_level
    out: list[str] = []
    for section in registry.sections.values():
        out.append(f"{hashes} `[{section.name}]`")
        out.append("")
        if section.help:
            out.append(" ".join(section.help.split()))
            out.append("")
        out.append("| Key | Type | Default | Environment variable | Description |")
        out.append("| --- | --- | --- | --- | --- |")
        for s in section.settings:
            env = ", ".join(f"`{v}`" for v in registry.env_vars(section.name, s.name))
            type_name = s.value_type.name + (" (optional)" if s.optional else "")
            row = [f"`{s.name}`", type_name, _default_text(s), env, _describe(s)]
            out.append("| " + " | ".join(_md_cell(cell) for cell in row) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _comment(text: str, width: int = 78) -> list[str]:
    lines: list[str] = []
    for paragraph in text.strip().split("\n\n"):
        if lines:
            lines.append("#")
        wrapped = textwrap.wrap(" ".join(paragraph.split()), width=width - 2) or [""]
        lines.extend(f"# {line}".rstrip() for line in wrapped)
    return lines


def render_example_toml(registry: Registry[Any], *, title: str | None = None) -> str:
    """A TOML file with every setting: its help as a comment, then ``key = default``.

    Optional settings (default unset) and secrets are written commented out,
    since TOML has no null and secrets belong in the environment.
    """
    out: list[str] = []
    head = title or f"fieldsync {registry.component} configuration"
    out += _comment(
        f"{head}.\n\n"
        "Every setting is shown with its default. Precedence: default < this file < environment. "
        f"Each setting can also be set as {registry.env_prefix}_<SECTION>_<KEY> "
        "(upper case), which is where secrets belong."
    )
    for section in registry.sections.values():
        out.append("")
        out.append(f"[{section.name}]")
        if section.help:
            out += _comment(section.help)
        for s in section.settings:
            out.append("")
            out += _comment(_describe(s).replace("**", "").replace("`", ""))
            envs = " or ".join(registry.env_vars(section.name, s.name))
            out.append(f"# Type: {s.value_type.name}. Environment: {envs}.")
            if s.optional or s.secret:
                example = s.example if s.example is not None else s.value_type.placeholder
                note = (
                    "not set by default"
                    if s.optional
                    else f"default {s.value_type.to_toml(s.default)}"
                )
                out.append(f"# ({note})")
                out.append(f"# {s.name} = {s.value_type.to_toml(example)}")
            else:
                out.append(f"{s.name} = {s.value_type.to_toml(s.default)}")
    return "\n".join(out) + "\n"


def generated_markers(name: str) -> tuple[str, str]:
    """The begin and end comment lines around a generated block in a Markdown document."""
    return f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"


def replace_generated_block(document: str, name: str, content: str) -> str:
    """Replace the text between the *name* markers of *document* with *content*."""
    begin, end = generated_markers(name)
    start = document.find(begin)
    stop = document.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"document has no generated block {name!r} ({begin} … {end})")
    return document[: start + len(begin)] + "\n\n" + content.strip("\n") + "\n\n" + document[stop:]
