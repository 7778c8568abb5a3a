"""Message text shown as the text it is: HTML escaped, Markdown code still rendered as code.

The chat box renders Markdown with HTML. A model or a researcher can write
``<script>``, ``<img src=x>`` or an unclosed code fence; shown raw, the first disappears,
the second draws a broken image and the third swallows whatever follows. Here prose is
HTML-escaped (code spans and fenced blocks are left alone: Markdown escapes those itself)
and an open fence is closed at the end of the message.
"""

from __future__ import annotations

import html
import re

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _escape_prose(line: str) -> str:
    out, last = [], 0
    for span in _CODE_SPAN.finditer(line):
        out.append(html.escape(line[last:span.start()], quote=False))
        out.append(span.group(0))
        last = span.end()
    out.append(html.escape(line[last:], quote=False))
    return "".join(out)


def literal_markdown(text: str) -> str:
    """``text`` as Markdown that shows exactly what was written (code still as code)."""
    lines, fence = [], None
    for line in text.split("\n"):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            lines.append(line)
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            lines.append(line)
        else:
            lines.append(_escape_prose(line))
    if fence is not None:
        lines.append(fence)
    return "\n".join(lines)
