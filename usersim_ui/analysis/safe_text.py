"""Message text shown as the text it is: no HTML, no link or image, code still shown as code.

The chat box, its badge titles and the transcript render Markdown with HTML. A model, a
researcher or an imported file can write ``<script>``, ``<img src=x onerror=...>``, a
``<form>`` with a password box, ``![x](http://tracker/pixel)`` or an unclosed code fence;
shown raw, the first disappears, the second and fourth fetch a URL the moment the page shows
them, the third asks for a password, and the last swallows whatever follows.

* **Prose** keeps its Markdown (bold, lists, tables) but is HTML-escaped, and whatever could
  start a link, an image or an autolink is escaped with a backslash (``\\[``, ``http\\://``,
  ``www\\.``, ``\\@``), as are backticks and tilde runs (so that what renders as code is what
  is found here) and dollar signs (Gradio's ``$$`` LaTeX block inserts its text as raw HTML
  and can re-cut the message around it); a backslash that would escape is itself escaped.
* **A code span** is written as ``<code>`` with every ASCII punctuation character as an
  entity. Left as Markdown its text would be raw, and marked (Gradio's parser) pairs emphasis
  across spans, which can leave a span's text outside code, live.
* **A fenced block** stays a Markdown fence, its text as written (highlighted, with a copy
  button), where marked reads exactly the same fence: it opens only at the start of a line
  (an indented one may belong to a list item), with nothing but a language name after the
  fence, never ``mermaid`` (Gradio renders that body as raw HTML); it closes exactly
  where marked closes it; lines end at ``\\n``, ``\\r\\n`` or ``\\r`` as marked reads them.
  A block that holds a ``$`` is written as ``<pre><code>`` with entities instead, since the
  LaTeX block looks for ``$$`` even inside code. An open fence is closed at the end.

Checked against marked 12 with Gradio's extensions on random mixes of these constructs: no
tag but the formatting ones came out.
"""

from __future__ import annotations

import html
import re

_FENCE = re.compile(r"^(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")  # CommonMark: closed by a run of equal length
_ESCAPING_BACKSLASH = re.compile(r"\\(?=[!-/:-@\[-`{-~])")  # a backslash that would escape what follows
_AUTOLINK = re.compile(r"(?i)(https?|ftp):(?=//)|(www)\.")
_INFO = re.compile(r"[ \t]*[\w+#.-]*[ \t]*")
_LINE_END = re.compile(r"(\r\n|\r|\n)")
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def code_text(text: str) -> str:
    """Text for inside ``<code>``: every ASCII punctuation character as an entity, so that neither
    HTML nor Markdown can act on it, while the browser still shows each character."""
    return "".join(f"&#{ord(c)};" if c in _PUNCTUATION else c for c in text)


def _inert(prose: str) -> str:
    """Prose as Markdown that renders as these characters and fetches or links nothing."""
    out = html.escape(prose, quote=False)
    out = _ESCAPING_BACKSLASH.sub(r"\\\\", out)  # the writer's own backslashes stay visible
    if out.endswith("\\"):  # before a line end (a hard break) or our own <code>: shown as written
        out += "\\"
    out = out.replace("`", "\\`").replace("[", "\\[").replace("@", "\\@").replace("$", "\\$")
    out = re.sub(r"~{3,}", lambda m: "\\~" * len(m.group(0)), out)
    return _AUTOLINK.sub(lambda m: f"{m.group(1)}\\:" if m.group(1) else f"{m.group(2)}\\.", out)


def _span(code: str) -> str:
    if len(code) > 2 and code[0] == code[-1] == " " and code.strip():
        code = code[1:-1]  # CommonMark drops one space each side
    return f"<code>{code_text(code)}</code>"


def _escape_line(line: str) -> str:
    out, last = [], 0
    for span in _CODE_SPAN.finditer(line):
        out.append(_inert(line[last:span.start()]))
        out.append(_span(span.group(2)))
        last = span.end()
    out.append(_inert(line[last:]))
    return "".join(out)


def _opens_fence(line: str) -> str | None:
    """The fence this line opens, if marked opens the same one here and renders it as code."""
    opened = _FENCE.match(line)
    if opened is None:
        return None
    info = line[opened.end():]  # kept raw, so only a language name: no $$, no HTML, no backtick
    if not _INFO.fullmatch(info) or info.strip().lower() == "mermaid":
        return None
    return opened.group(1)


def _closes_fence(line: str, fence: str) -> bool:
    """marked's closing line: up to three spaces, the opening run, then only backticks, tildes or spaces."""
    return re.fullmatch(r" {0,3}" + re.escape(fence) + r"[~`]* *", line) is not None


def _block(opener: str, body: list[str], closer: str) -> str:
    """A fenced block as written (``opener`` with its line end, the body's lines with theirs, the
    closing line), or as entity-encoded HTML when it holds a ``$``."""
    text = "".join(body)
    if "$" in text:
        return f"<pre><code>{code_text(text.rstrip(chr(10) + chr(13)))}</code></pre>"
    written = opener + text
    return written + ("" if written.endswith(("\n", "\r")) else "\n") + closer


def literal_markdown(text: str) -> str:
    """``text`` as Markdown that shows exactly what was written (code still as code)."""
    parts = _LINE_END.split(text)  # line, end, line, end, ..., line
    out: list[str] = []
    fence = ""
    opener = ""
    body: list[str] | None = None  # the lines (with their ends) of an open fenced block
    for index in range(0, len(parts), 2):
        line, end = parts[index], parts[index + 1] if index + 1 < len(parts) else ""
        if body is not None:
            if _closes_fence(line, fence):
                out += [_block(opener, body, line), end]
                body = None
            else:
                body += [line, end]
        elif opened := _opens_fence(line):
            fence, opener, body = opened, line + end, []
        else:
            out += [_escape_line(line), end]
    if body is not None:
        out.append(_block(opener, body, fence))
    shown = "".join(out)
    # a fence on the first line starts on a line of its own, wherever a caller puts the text
    # ("- detail: ..."): after a prefix marked would not see it, and its text would be raw prose
    return "\n" + shown if _opens_fence(_LINE_END.split(shown, 1)[0]) else shown


def literal_line(text: str) -> str:
    """One line of plain text (a badge, a title) as inert Markdown: no code, no line break."""
    return _inert(" ".join(_LINE_END.split(text)[::2]))


_BACKSLASHED = re.compile(r"\\([!-/:-@\[-`{-~])")
_CODE_TAG = re.compile(r"<code>(.*?)</code>")


def plain_text(shown: str) -> str:
    """The text a message shown by :func:`literal_markdown` stands for: what a researcher means
    when they edit it in the chat (which hands back the Markdown). Exact for prose (backslash
    escapes and entities undone, a code span back between backticks); a fenced block comes back
    as its fence."""
    text = _CODE_TAG.sub(lambda m: "`" + m.group(1) + "`", shown.strip("\n"))
    return html.unescape(_BACKSLASHED.sub(r"\1", text))
