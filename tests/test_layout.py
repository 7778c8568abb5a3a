"""The house's layout holds: the core needs no model, page or network library, and the tier
contracts in ``.importlinter`` are kept (CI runs ``lint-imports`` too)."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import usersim_ui.core

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "gradio", "spaces", "pandas", "numpy", "plotly", "httpx", "openai")


def test_the_core_imports_without_torch_or_gradio():
    modules = [f"usersim_ui.core.{m.name}" for m in pkgutil.iter_modules(usersim_ui.core.__path__)]
    assert {"usersim_ui.core.errors", "usersim_ui.core.protocols", "usersim_ui.core.guardrails"} <= set(modules)
    code = (f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(set({HEAVY!r}) & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the core pulled in {out.stdout.strip()}"


def test_the_tier_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _layout_bullets() -> dict[str, str]:
    """The README's Layout section, one text per bullet, keyed by the folder the bullet opens with."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    bullets: dict[str, str] = {}
    for bullet in section.split("\n- ")[1:]:
        head = bullet.split("`", 2)[1] if bullet.startswith("`") else ""
        bullets[head] = " ".join(bullet.split())
    return bullets


def test_the_readme_layout_names_every_module():
    """The README's Layout lists every module under its tier, so a new module cannot hide."""
    bullets = _layout_bullets()
    missing = []
    for path in sorted((ROOT / "usersim_ui").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(ROOT).as_posix()
        folder = rel.rsplit("/", 1)[0] + "/"
        text = bullets.get(folder, "") if folder != "usersim_ui/" else bullets.get(rel, "")
        if f"`{path.name}`" not in text and f"`{rel}`" not in text:
            missing.append(rel)
    assert not missing, f"README's Layout does not name: {missing}"
