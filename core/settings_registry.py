"""Declarative settings registry: a TOML file plus environment overrides -> frozen, typed settings.

A component (cdc daemon, relay, device agent) declares its settings once, as
:class:`Setting` objects grouped into :class:`Section` objects, each section
bound to a frozen dataclass that gives typed attribute access
(``settings.postgres.dsn``).  The :class:`Registry` then loads a TOML file
(``tomllib``) and the environment into an instance of the component's top-level
frozen dataclass.  How values are read and written lives in
:mod:`core.settings_types`; the Markdown tables and the commented example TOML
are rendered by :mod:`core.settings_docs`; value checks shared by several
components (DSNs, Kafka names, numbers) are in :mod:`core.settings_checks`.

Precedence, lowest first: the setting's default, the TOML file, the environment.

Environment variables: every setting can be set as ``FIELDSYNC_<SECTION>_<KEY>``
in upper case (``FIELDSYNC_POSTGRES_PASSWORD``); a setting may name one extra
alias (``Setting.env``), used only when the canonical variable is absent.
Values are parsed from text: booleans accept ``true/false/1/0/yes/no`` (any
case), lists are comma-separated (blank items dropped), and for a setting whose
default is ``None`` an empty value means "not set".  The environment is shared
by several components, so a ``FIELDSYNC_<SECTION>_*`` variable that names no
setting of a known section only logs a warning; other variables are ignored.

Errors: every problem raises :class:`core.errors.ConfigError` whose message
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
between threads.  Loading does file I/O only in :meth:`Registry.load`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import stat
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from core.errors import ConfigError
from core.settings_checks import closest_match
from core.settings_types import (
    ValueType,
    shorten,
    toml_literal_or_repr,
    toml_type_name,
    value_type,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "FIELDSYNC"
MASK = "***"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")

M = TypeVar("M")


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
        return shorten(repr(value))

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
    match = closest_match(word, candidates)
    return f"; did you mean {fmt.format(match)}?" if match is not None else ""


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

    def load(
        self,
        path: str | Path | None,
        environ: Mapping[str, str] | None = None,
        *,
        check: Callable[[M], None] | None = None,
    ) -> M:
        """Defaults, then the TOML file at *path* (if not None), then *environ* (default os.environ).

        *check* is run after the registry's own checks, for a rule one user of the
        settings needs (a process that must have some optional setting); like them it
        raises ``ValueError``, which becomes a :class:`ConfigError` naming the source.
        """
        if path is None:
            return self.load_data({}, source="(no file)", environ=environ, check=check)
        path = Path(path)
        data = _read_settings_file(path)
        self._warn_readable_secrets(path, data)
        return self.load_data(data, source=str(path), environ=environ, check=check)

    def defaults(self) -> M:
        """The settings with every default (no file, empty environment)."""
        return self.load_data({}, source="(defaults)", environ={})

    def load_data(
        self,
        data: Mapping[str, Any],
        *,
        source: str,
        environ: Mapping[str, str] | None = None,
        check: Callable[[M], None] | None = None,
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
        for whole in (self.check, check):
            if whole is not None:
                try:
                    whole(result)
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
                f"got {toml_type_name(table)}"
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
            shown = "(value hidden)" if setting.secret else shorten(toml_literal_or_repr(raw))
            detail = f" ({exc})" if str(exc) and not setting.secret else ""
            raise ConfigError(
                f"{source}: {key}: expected {setting.value_type.name}, "
                f"got {toml_type_name(raw)} {shown}{detail}"
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
            shown = "(value hidden)" if setting.secret else shorten(repr(text))
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

    def secrets(self, settings: M) -> list[str]:
        """What :meth:`redact` hides, for :func:`core.redaction.hide_secrets` (logs never
        show it): the values of the secret settings, and the parts a setting's ``redact``
        masks (the password inside a DSN)."""
        found = []
        for section in self.sections.values():
            for s in section.settings:
                value = getattr(getattr(settings, section.name), s.name)
                if not isinstance(value, str) or not value:
                    continue
                if s.secret:
                    found.append(value)
                elif s.redact is not None:
                    found += _masked_parts(value, str(s.redact(value)))
        return found


def _masked_parts(value: str, redacted: str) -> list[str]:
    """The parts of *value* that *redacted* shows as ``***`` (all of it if they cannot be
    told apart)."""
    pattern = "(.+?)".join(re.escape(part) for part in redacted.split(MASK))
    match = re.fullmatch(pattern, value, re.DOTALL)
    if match is None:
        return [value]
    return [part for part in match.groups() if part]


def _read_settings_file(path: Path) -> dict[str, Any]:
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
