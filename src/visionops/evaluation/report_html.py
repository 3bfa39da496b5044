"""A Markdown report as one self-contained HTML file, for MLflow's artifact viewer (and any browser).

MLflow shows `report.md` as plain text, so `![caption](plot.png)` stays literal. The HTML version
renders the Markdown (with tables) and embeds each image beside the report as a base64 data URI, so
the file needs nothing else. Deterministic: the same Markdown and images give the same bytes.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from visionops import atomic

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem}"
    "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}"
)


def render(markdown_text: str, image_dir: Path, title: str) -> str:
    """`markdown_text` as a standalone HTML page; images named relative to `image_dir` are embedded."""
    import markdown

    def embed(match: re.Match) -> str:
        data = base64.b64encode((Path(image_dir) / match.group(2)).read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = markdown.markdown(_IMAGE.sub(embed, markdown_text), extensions=["tables"])
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def write(markdown_path: Path, title: str) -> Path:
    """Write `markdown_path` as report.html beside it (images from the same folder); return its path."""
    markdown_path = Path(markdown_path)
    out = markdown_path.with_suffix(".html")
    atomic.write_text(out, render(markdown_path.read_text(), markdown_path.parent, title))
    return out
