"""The report document: blocks rendered both to Markdown and to one self-contained HTML page."""
from __future__ import annotations

import html
import re
from typing import Sequence


def _inline_html(text: str) -> str:
  """Escapes, then `code` and **bold** (the only inline markup the report uses)."""
  out = html.escape(str(text), quote=True)
  out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
  return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Doc:
  def __init__(self):
    self.blocks: list[tuple] = []

  def h(self, level: int, text: str):
    self.blocks.append(("h", level, text))

  def p(self, text: str):
    self.blocks.append(("p", text))

  def missing(self, text: str):
    self.blocks.append(("missing", text))

  def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]):
    self.blocks.append(("table", list(header), [list(r) for r in rows]))

  def figure(self, relpath: str, caption: str):
    self.blocks.append(("figure", relpath, caption))

  def details(self, summary: str, text: str, lang: str = ""):
    self.blocks.append(("details", summary, text, lang))

  def bullets(self, items: Sequence[str]):
    self.blocks.append(("bullets", list(items)))

  def markdown(self) -> str:
    out = []
    for b in self.blocks:
      kind = b[0]
      if kind == "h":
        out.append("#" * b[1] + " " + b[2])
      elif kind == "p":
        out.append(b[1])
      elif kind == "missing":
        out.append("> **Missing:** " + b[1])
      elif kind == "bullets":
        out.append("\n".join(f"- {item}" for item in b[1]))
      elif kind == "table":
        cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(cell(c) for c in b[1]) + " |", "|" + "---|" * len(b[1])]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b[2]]
        out.append("\n".join(lines))
      elif kind == "figure":
        out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
      elif kind == "details":
        out.append(f"<details><summary>{html.escape(b[1])}</summary>\n\n```{b[3]}\n{b[2]}\n```\n\n</details>")
    return "\n\n".join(out) + "\n"

  def html(self, title: str) -> str:
    out = []
    for b in self.blocks:
      kind = b[0]
      if kind == "h":
        out.append(f'<h{b[1]} id="{_slug(b[2])}">{_inline_html(b[2])}</h{b[1]}>')
      elif kind == "p":
        out.append(f"<p>{_inline_html(b[1])}</p>")
      elif kind == "missing":
        out.append(f'<p class="missing"><strong>Missing:</strong> {_inline_html(b[1])}</p>')
      elif kind == "bullets":
        out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
      elif kind == "table":
        head = "".join(f"<th>{_inline_html(c)}</th>" for c in b[1])
        body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in b[2])
        out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
      elif kind == "figure":
        src = html.escape(b[1], quote=True)
        out.append(f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(b[2], quote=True)}"></a>'
                   f"<figcaption>{_inline_html(b[2])}</figcaption></figure>")
      elif kind == "details":
        out.append(f"<details><summary>{_inline_html(b[1])}</summary><pre>{html.escape(b[2])}</pre></details>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(out) + "\n</main>\n</body>\n</html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;margin:0;background:#fff}
main{max-width:1150px;margin:0 auto;padding:1.5rem 2rem 4rem}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3rem}h2{border-bottom:1px solid #d0d7de;margin-top:2.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}tbody tr:nth-child(even){background:#fafbfc}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:.9rem;margin-top:.3rem}
code{background:#f6f8fa;padding:.1rem .3rem;border-radius:4px;font-size:.88em}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;font-size:.8rem}
.missing{border-left:4px solid #d97706;background:#fff7ed;padding:.5rem .8rem}
details{margin:.8rem 0}summary{cursor:pointer;font-weight:600}
"""
