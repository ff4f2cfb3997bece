"""Rendering a settings registry: Markdown tables for the docs, a commented example TOML.

Each component's settings module (``cdc/settings.py``, ``relay/settings.py``) renders
its :class:`core.settings_registry.Registry` with these functions and writes the
result into a generated block of a Markdown document (between the markers of
:func:`generated_markers`) or into an example TOML file; tests compare the files in
the tree with a fresh rendering, so the docs cannot drift from the declarations.

Concurrency: every function here is pure (text in, text out); the file I/O is the
caller's.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from typing import Any

from core.settings_registry import Registry, Section, Setting

__all__ = [
    "generated_markers",
    "render_example_toml",
    "render_markdown",
    "replace_generated_block",
]


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


def _chosen(registry: Registry[Any], sections: Iterable[str] | None) -> list[Section]:
    if sections is None:
        return list(registry.sections.values())
    return [registry.sections[name] for name in sections]


def render_markdown(
    registry: Registry[Any], *, heading_level: int = 3, sections: Iterable[str] | None = None
) -> str:
    """Each section of *registry* (or those named in *sections*, in that order) as a heading,
    its help and a Markdown table of its settings."""
    hashes = "#" * heading_level
    out: list[str] = []
    for section in _chosen(registry, sections):
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
