"""Waits the browser tests share.

A Gradio tab or accordion mounts its children when it is first shown, so an element may not
exist yet in the instant after a click: a predicate that reads ``.innerText`` of ``null`` throws,
and Playwright's ``wait_for_function`` fails at once instead of waiting (seen on CI under load).
Every wait on an element's text goes through here and treats a missing element as "not yet".
"""
from __future__ import annotations

import json
from typing import Any


def wait_for_text(page: Any, selector: str, text: str, *, absent: bool = False, timeout: float = 30_000) -> None:
    """Wait until the element ``selector`` shows ``text`` (or, with ``absent``, exists and does not)."""
    found = f"(document.querySelector({json.dumps(selector)})?.innerText ?? null)"
    test = f"t !== null && {'!' if absent else ''}t.includes({json.dumps(text)})"
    page.wait_for_function(f"() => {{ const t = {found}; return {test}; }}", timeout=timeout)
