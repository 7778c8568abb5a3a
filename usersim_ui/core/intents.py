"""The sample intents shipped in ``sample_intents/``, one JSON object per line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_intents"


@dataclass(frozen=True)
class SampleIntent:
    id: str
    title: str
    category: str
    intent: str


def load_sample_intents(directory: Path = SAMPLE_DIR) -> list[SampleIntent]:
    """All ``*.jsonl`` files of the folder, in file then line order."""
    intents = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                intents.append(SampleIntent(**json.loads(line)))
    return intents


def sample_intent(intent_id: str) -> SampleIntent:
    for item in load_sample_intents():
        if item.id == intent_id:
            return item
    raise KeyError(f"no sample intent {intent_id!r}; known: {', '.join(i.id for i in load_sample_intents())}")
