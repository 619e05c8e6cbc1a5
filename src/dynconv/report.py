"""Self-contained HTML reports: tables, figures and images embedded as data URIs, so one
file can be mailed, archived or opened from a run directory without its neighbours."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def array_png(image) -> bytes:
    """PNG bytes of an (H, W, 3) float array in [0, 1] or a uint8 array."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _format(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4g}"
    return str(value)


@dataclass
class Report:
    """Build a report section by section, then :meth:`write` it."""

    title: str
    sections: list[str] = field(default_factory=list)

    def heading(self, text: str) -> "Report":
        self.sections.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def paragraph(self, text: str) -> "Report":
        self.sections.append(f"<p>{html.escape(text)}</p>")
        return self

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> "Report":
        if not rows:
            return self
        columns = list(columns or rows[0].keys())
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_format(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in rows
        )
        self.sections.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def image(self, png: bytes, caption: str = "", width: int | None = None) -> "Report":
        style = f' style="width:{width}px"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.sections.append(f'<figure><img src="{png_data_uri(png)}"{style} alt="{html.escape(caption)}">{cap}</figure>')
        return self

    def images(self, items: Sequence[tuple[bytes, str]], width: int | None = None) -> "Report":
        start = len(self.sections)
        for png, caption in items:
            self.image(png, caption, width)
        row = "".join(self.sections[start:])
        del self.sections[start:]
        self.sections.append(f'<div class="row">{row}</div>')
        return self

    def render(self) -> str:
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
            "figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:12px;color:#555}"
            "img{image-rendering:pixelated;max-width:100%}.row{display:flex;flex-wrap:wrap}"
        )
        body = "\n".join(self.sections)
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path
