"""report.html: report.md as one self-contained HTML file, its plots embedded as base64 PNG data URIs.

The file can be mailed or opened anywhere: no JavaScript, no external resource (a Content-Security-Policy
forbids both), only relative links to files of the sweep folder where report.md has them (the worst cases).

The converter handles the markdown subset that document.render_markdown writes: ATX headings, paragraphs,
pipe tables (with their alignment row), bulleted and numbered lists, fenced code, and inline code spans,
**bold**, links and images. Our own, not a markdown library: the report's text holds values from run folders,
which are untrusted (docs/safety.md), and here every piece of text is passed through html.escape and every
link target is percent-encoded (no scheme can survive, so no `javascript:` link), whatever a run named
itself. An image becomes a data URI only when it is one of the report's own PNGs (`images`); any other is
shown as its caption.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.*)$")  # closing #s and spaces are stripped after
_TABLE_ALIGN = re.compile(r"^\s*\|?(\s*:?-+:?\s*\|)+\s*(:?-+:?\s*)?$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d{1,9}[.)]\s+(.*)$")
_IMAGE_LINE = re.compile(r"^!\[[^\]]*\]\((?:[^()]|\([^()]*\))*\)$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
# A link target may hold one level of balanced parentheses (a run folder's name may). Every pattern scans a
# line in about linear time, whatever it holds: a tick run is taken whole (no retrying shorter runs), link
# text stops at the next bracket; and a line longer than MAX_INLINE_CHARS is escaped without formatting.
_INLINE = re.compile(
    r"(?<!`)(?P<ticks>`+)(?!`)(?P<code>.+?)(?<!`)(?P=ticks)(?!`)"
    r"|!\[(?P<alt>[^\[\]]*)\]\((?P<src>(?:[^()]|\([^()]*\))*)\)"
    r"|\[(?P<text>[^\[\]]*)\]\((?P<href>(?:[^()]|\([^()]*\))*)\)"
    r"|\*\*(?P<bold>.+?)\*\*"
    r"|\\(?P<escaped>[\\`*_{}\[\]()#+\-.!|<>])"
)
MAX_INLINE_CHARS = 20_000

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 72rem;
       margin: 1.5rem auto; padding: 0 1rem; line-height: 1.45; color: #1b1b1b; }
h1, h2, h3, h4 { line-height: 1.2; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #c8c8c8; padding: 0.25em 0.6em; vertical-align: top; }
th { background: #f0f0f0; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; font-size: 0.92em; }
pre { background: #f3f3f3; padding: 0.6em; overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
figcaption { font-size: 0.9em; color: #555; }
.missing { color: #8a1c1c; }
"""
# No script, no external fetch of any kind: images only as data URIs, styles only inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def href(target: str) -> str:
    """A link target as a safe relative URL: percent-encoded except '/' (so ':' cannot start a scheme such
    as javascript:), with a leading '//' (a network path) reduced to one '/'."""
    url = quote(target.strip(), safe="/")
    return "/" + url.lstrip("/") if url.startswith("//") else url


def _image(alt: str, src: str, images: Mapping[str, bytes]) -> str:
    data = images.get(src.strip())
    if data is None or not data.startswith(PNG_MAGIC):
        return f'<span class="missing">[plot not embedded: {html.escape(alt)}]</span>'
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def inline(text: str, images: Mapping[str, bytes]) -> str:
    """One line of markdown text as escaped HTML with its code spans, bold, links and images."""
    if len(text) > MAX_INLINE_CHARS:
        return html.escape(text)
    out, pos = [], 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[pos : match.start()]))
        pos = match.end()
        if match["code"] is not None:
            out.append(f"<code>{html.escape(match['code'].strip())}</code>")
        elif match["src"] is not None:
            out.append(_image(match["alt"], match["src"], images))
        elif match["href"] is not None:
            label = inline(match["text"], images)
            out.append(f'<a href="{html.escape(href(match["href"]))}">{label}</a>')
        elif match["bold"] is not None:
            out.append(f"<strong>{inline(match['bold'], images)}</strong>")
        else:
            out.append(html.escape(match["escaped"]))
    out.append(html.escape(text[pos:]))
    return "".join(out)


def split_row(line: str) -> list[str]:
    """The cells of a pipe-table row ('\\|' inside a cell is a literal pipe)."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(body)]


def _is_table(lines: list[str], i: int) -> bool:
    return lines[i].lstrip().startswith("|") and i + 1 < len(lines) and bool(_TABLE_ALIGN.match(lines[i + 1]))


def _table(lines: list[str], i: int, images: Mapping[str, bytes]) -> tuple[list[str], int]:
    header = split_row(lines[i])
    align = [
        "r" if a.strip().endswith(":") and not a.strip().startswith(":") else "l"
        for a in split_row(lines[i + 1])
    ]
    align += ["l"] * (len(header) - len(align))

    def cells(row: list[str], tag: str) -> str:
        row = (row + [""] * len(header))[: len(header)]
        opens = {"r": f'<{tag} class="r">', "l": f"<{tag}>"}
        return "".join(f"{opens[a]}{inline(c, images)}</{tag}>" for c, a in zip(row, align))

    out = ["<table>", f"<thead><tr>{cells(header, 'th')}</tr></thead>", "<tbody>"]
    i += 2
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        out.append(f"<tr>{cells(split_row(lines[i]), 'td')}</tr>")
        i += 1
    out += ["</tbody>", "</table>"]
    return out, i


def _list(lines: list[str], i: int, images: Mapping[str, bytes]) -> tuple[list[str], int]:
    pattern = _BULLET if _BULLET.match(lines[i]) else _NUMBERED
    tag = "ul" if pattern is _BULLET else "ol"
    items: list[str] = []
    while i < len(lines) and lines[i].strip():
        found = pattern.match(lines[i])
        if found:
            items.append(found.group(1))
        elif lines[i].startswith((" ", "\t")) and items and not _starts_block(lines, i):
            items[-1] += " " + lines[i].strip()  # a continuation of the item
        else:
            break
        i += 1
    return [f"<{tag}>", *(f"<li>{inline(item, images)}</li>" for item in items), f"</{tag}>"], i


def _starts_block(lines: list[str], i: int) -> bool:
    line = lines[i]
    return bool(
        _HEADING.match(line)
        or line.startswith("```")
        or _is_table(lines, i)
        or _BULLET.match(line)
        or _NUMBERED.match(line)
        or _IMAGE_LINE.match(line.strip())
    )


def _figure(line: str, images: Mapping[str, bytes]) -> str:
    caption = line[2 : line.index("]")]
    return f"<figure>{inline(line, images)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def body(markdown: str, images: Mapping[str, bytes]) -> str:
    """The HTML of the markdown's blocks (see the module docstring for the subset)."""
    lines = markdown.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif heading := _HEADING.match(line):
            level, text = len(heading.group(1)), heading.group(2).rstrip(" \t#").rstrip()
            out.append(f"<h{level}>{inline(text, images)}</h{level}>")
            i += 1
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append(f"<pre><code>{html.escape(chr(10).join(lines[i + 1 : end]))}</code></pre>")
            i = end + 1
        elif _is_table(lines, i):
            block, i = _table(lines, i, images)
            out += block
        elif _BULLET.match(line) or _NUMBERED.match(line):
            block, i = _list(lines, i, images)
            out += block
        elif _IMAGE_LINE.match(line.strip()):
            out.append(_figure(line.strip(), images))
            i += 1
        else:
            paragraph = [line.strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
                paragraph.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inline(' '.join(paragraph), images)}</p>")
    return "\n".join(out)


def _title(markdown: str) -> str:
    for line in markdown.splitlines():
        if heading := _HEADING.match(line):
            return re.sub(r"[`*]", "", heading.group(2))
    return "Sweep report"


def render_html(markdown: str, images: Mapping[str, bytes]) -> str:
    """The whole document: `markdown` (report.md's text) with every image whose target is a key of `images`
    embedded from those PNG bytes."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(_title(markdown))}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{body(markdown, images)}\n</body>\n</html>\n"
    )


def write_html(markdown: str, images: Mapping[str, Path], path: Path) -> Path:
    """Write render_html of `markdown` to `path`; `images` maps each image target in the markdown to the
    PNG file to embed."""
    data = {target: Path(file).read_bytes() for target, file in images.items()}
    path.write_text(render_html(markdown, data), encoding="utf-8", errors="replace")
    return path
