"""The malloc settings app.py applies: set once, on glibc, unless the environment sets them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "from usersim_ui.inference.memory import limit_malloc_growth as f; a = f(); print(sorted(a.items()), f() is a)"


def probe(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**environment, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_settings_apply_once_and_yield_to_the_environment():
    assert probe() == "[('arena_max', 2), ('mmap_threshold', 1048576)] True"
    assert probe(MALLOC_ARENA_MAX="4") == "[('mmap_threshold', 1048576)] True"
    assert probe(MALLOC_ARENA_MAX="4", MALLOC_MMAP_THRESHOLD_="65536") == "[] True"
