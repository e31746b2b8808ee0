"""The report page: sections of text, tables and figures rendered as one static HTML file.

Pure: :func:`render_page` turns :class:`Section` objects into a string. Figures are
referenced by relative paths (``figures/heatmap_P1.png``), never inlined or absolute, so
the directory can be opened from disk, served by any web server, or read from S3.
Every piece of text is escaped; tables come from pandas with escaping on.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; font-size: 0.85rem; }
nav a { margin-right: 0.8rem; font-size: 0.9rem; }
section { border-top: 1px solid #ddd; margin-top: 1.5rem; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8rem; color: #555; max-width: 40rem; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
.missing { color: #a60; } .error { color: #b00; }
"""


@dataclass
class FigureRef:
    """A PNG beside the page: ``src`` relative to the page, with a caption."""

    src: str
    caption: str = ""
    alt: str = ""


@dataclass
class Section:
    """One part of the report. ``missing`` (a stage that has not run) or ``error`` replace
    the content with a note; ``notes`` are paragraphs of plain text."""

    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[FigureRef] = field(default_factory=list)
    missing: str | None = None
    error: str | None = None

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def render_page(title: str, sections: list[Section], *, subtitle: str = "") -> str:
    """The whole HTML document (UTF-8 text) for ``sections`` in order."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{esc(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             f"<h1>{esc(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="meta">{esc(subtitle)}</p>')
    parts.append("<nav>" + "".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections) + "</nav>")
    for s in sections:
        parts.append(f'<section id="{s.anchor}">')
        parts.append(f"<h2>{esc(s.title)}</h2>")
        if s.missing:
            parts.append(f'<p class="missing">{esc(s.missing)}</p>')
        if s.error:
            parts.append(f'<p class="error">could not render this section: {esc(s.error)}</p>')
        for note in s.notes:
            parts.append(f"<p>{esc(note)}</p>")
        for caption, table in s.tables:
            if caption:
                parts.append(f"<h3>{esc(caption)}</h3>")
            parts.append(table.to_html(index=False, escape=True, border=0, na_rep="",
                                       float_format=lambda v: f"{v:.3g}"))
        for fig in s.figures:
            parts.append(f'<figure><img src="{esc(fig.src, quote=True)}" alt="{esc(fig.alt or fig.caption, quote=True)}"'
                         ' loading="eager">'
                         + (f"<figcaption>{esc(fig.caption)}</figcaption>" if fig.caption else "") + "</figure>")
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
