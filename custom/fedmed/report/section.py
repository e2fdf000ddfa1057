"""A report section: what :mod:`fedmed.report.render` writes as Markdown and HTML.

Its own module so that section builders outside ``render`` (e.g. :mod:`fedmed.report.participation`)
need not import ``render``, which imports them. Pure module: never imports ``nvflare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Section:
    title: str
    paragraphs: list[str | list[str]] = field(default_factory=list)  # a list of strings renders as a bullet list
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    image: str | None = None  # a file name from plot_files(metric)
    caption: str = ""
