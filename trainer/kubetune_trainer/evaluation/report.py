"""report.html: one self-contained page a person opens anywhere, a phone included.

Everything is inside the file: styles inline, pictures as `data:image/png;base64,` URIs, no script, no
font, nothing fetched (a Content-Security-Policy that allows only data: images says so to the browser).
Every text from a run (class names, the job's name, URIs) is HTML-escaped; the parts are built with the
helpers here, so a task's sections (`Section`) are safe HTML by construction.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

STYLE = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); }
main { max-width: 60rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.5rem; margin: .5rem 0; word-break: break-word; }
h2 { font-size: 1.2rem; margin: 2rem 0 .5rem; border-bottom: 1px solid var(--line); padding-bottom: .25rem; }
p { margin: .5rem 0; }
.note { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: .5rem .75rem; }
.muted { color: var(--muted); font-size: .9rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(9rem, 1fr)); gap: .5rem; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .5rem .75rem; }
.card b { display: block; font-size: 1.3rem; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; font-size: .9rem; min-width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: .3rem .5rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f8fa; }
figure { margin: 1rem 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .85rem; margin-top: .25rem; }
code { font-size: .85rem; word-break: break-all; }
dt { font-weight: 600; margin-top: .5rem; }
dd { margin: 0 0 0 1rem; word-break: break-word; }
"""

# Only inline styles and data: images: the page can fetch nothing and run nothing.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}%}"


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{esc(css)}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>"


def cards(items: Sequence[tuple[str, str]]) -> str:
    """Headline figures: (label, value) tiles that wrap on a narrow screen."""
    body = "".join(f'<div class="card"><b>{esc(value)}</b>{esc(label)}</div>' for label, value in items)
    return f'<div class="cards">{body}</div>'


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table that scrolls sideways on a narrow screen instead of overflowing the page."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def facts(items: Sequence[tuple[str, str]]) -> str:
    """(term, text) pairs that wrap on a narrow screen: what a table too wide for a phone would hold."""
    body = "".join(f"<dt>{esc(term)}</dt><dd>{esc(text)}</dd>" for term, text in items)
    return f"<dl>{body}</dl>"


def figure(png: bytes, alt: str, caption: str = "") -> str:
    """A PNG embedded as a data URI, scaled to the screen's width."""
    data = base64.b64encode(png).decode("ascii")
    caption_html = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{caption_html}</figure>'


@dataclass(frozen=True)
class Section:
    """A titled part of the report; `parts` are HTML made by the helpers above."""

    title: str
    parts: Sequence[str] = field(default_factory=tuple)

    def html(self) -> str:
        return f"<section><h2>{esc(self.title)}</h2>{''.join(self.parts)}</section>"


def render(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole page."""
    body = "".join(section.html() for section in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f'<body><main><h1>{esc(title)}</h1><p class="muted">{esc(subtitle)}</p>{body}</main></body></html>\n'
    )
