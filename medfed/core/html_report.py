"""report.html: the run report as one self-contained file a coordinator can mail.

The same text as report.md (rendered by Python-Markdown, tables included), with the
run's plot inlined as a data: URI and a small inline style sheet: no script, no
external reference, nothing fetched when it is opened.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

#: Inline style: readable tables and code in any mail client or browser.
_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #1b1f24; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #c8ccd1; padding: 0.2rem 0.6rem; text-align: left; }
th { background: #f1f3f5; }
pre, code { background: #f6f8fa; font-size: 13px; }
pre { padding: 0.6rem; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #e1e4e8; }
"""


def render_html(markdown_text: str, *, title: str, images: dict[str, Path]) -> str:
    """The page of ``markdown_text``; each ``images`` file (name -> path) is inlined.

    A reference to an image's name in the text (``metrics.png``) links to its inline
    copy; the images also follow the text under "Plots".
    """
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    figures = []
    for name, path in images.items():
        if not path.exists():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        anchor = re.sub(r"[^a-z0-9]+", "-", name.lower())
        figures.append(
            f'<figure id="{anchor}"><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(name)}</figcaption>'
            "</figure>"
        )
        body = body.replace(f"<code>{html.escape(name)}</code>", f'<a href="#{anchor}">{name}</a>')
    plots = "<h2>Plots</h2>\n" + "\n".join(figures) if figures else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n{plots}\n</body></html>\n"
    )
