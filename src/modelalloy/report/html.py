"""One self-contained HTML file: text, tables and PNG figures (embedded as data: URIs), no scripts.

Nothing is fetched when the page opens (no fonts, styles or scripts from elsewhere), so it renders
the same offline, attached to an email, or in a CI artifact.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
td { white-space: nowrap; }  /* an interval stays on one line */
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .85rem; }
img { max-width: 100%; border: 1px solid #eee; margin: .5rem 0; }
.note { color: #8a5a00; }
"""


@dataclass
class Report:
    """Blocks of HTML in order; build with the add_* methods, then `write(path)`."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, *, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.blocks.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, headers: list[str], rows: list[list], *, caption: str | None = None) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, png: bytes, alt: str) -> None:
        data = base64.b64encode(png).decode("ascii")
        self.blocks.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')

    def to_html(self) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{html.escape(self.title)}</h1>\n" + "\n".join(self.blocks) + "\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_html(), encoding="utf-8")
        os.replace(tmp, path)
        return path


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
