"""The example gallery: finished dialogues shipped as JSONL in ``docs/examples/``.

Each was made by the CLI (``python -m usersim_ui.simulate ... --jsonl``) and its record says
which model played each side, so the page can say honestly what a visitor is looking at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from usersim_ui.core.dialogue import Dialogue, dialogues_from_jsonl

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "docs" / "examples"


@dataclass(frozen=True)
class Example:
    path: Path
    dialogue: Dialogue

    @property
    def label(self) -> str:
        user = (self.dialogue.user_model or "unknown model").split(" (")[0]
        return f"{self.path.stem.replace('-', ' ')} — user: {user}, {len(self.dialogue.turns)} turns"


def load_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    """Every example dialogue, sorted by file name; none when the folder is absent."""
    if not folder.is_dir():
        return []
    return [Example(path, dialogues_from_jsonl(path.read_text(encoding="utf-8"))[0])
            for path in sorted(folder.glob("*.jsonl"))]
