"""The assistant kinds' table (``assistants.registry.KINDS``) is the one place a kind is
defined: spec strings, the CLIs' help, the page's and the batch tab's choices and who needs the
model lock all read it, so a new kind is its module and a row."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from usersim_ui.assistants import registry
from usersim_ui.assistants.registry import (
    BATCH_CHOICES,
    KINDS,
    PAGE_CHOICES,
    SPEC_FORMS,
    AssistantKind,
    BackendSpec,
    kind_of,
    needs_endpoint,
    parse_spec,
    researcher_types,
    spec_text,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text", ["local", "local:/models/chat", "openai:http://gpu:8001/v1:llama-3-8b", "scripted"])
def test_a_spec_string_reads_back_as_itself(text):
    spec = parse_spec(text, BackendSpec(api_key="sk-secret", max_tokens=7))
    assert spec_text(spec) == text and parse_spec(spec_text(spec)) == replace(spec, api_key="", max_tokens=128)
    assert "sk-secret" not in spec_text(spec)  # specs go into records and reports; keys never do


@pytest.mark.parametrize("text, url, model", [
    ("openai:http://host:8000/v1:org/model", "http://host:8000/v1", "org/model"),  # a URL keeps its port
    ("openai:http://host/v1:llama3:8b", "http://host/v1", "llama3:8b"),  # a model name keeps its tag
    ("openai:http://host:8000:m", "http://host:8000", "m"),  # no path: the last colon splits
])
def test_spec_parts_split_where_the_url_ends(text, url, model):
    spec = parse_spec(text)
    assert (spec.kind, spec.base_url, spec.model) == ("openai", url, model) and parse_spec(spec_text(spec)) == spec
    assert parse_spec("local:") == parse_spec("local") and parse_spec("scripted:").kind == "scripted"
    with pytest.raises(ValueError, match="openai:URL:MODEL"):
        parse_spec("openai:")
    with pytest.raises(ValueError, match="unknown assistant"):
        parse_spec("claude")


def test_every_view_of_the_kinds_comes_from_the_table():
    assert SPEC_FORMS == "local | local:MODEL | openai:URL:MODEL | scripted"  # no kind the researcher types
    assert [name for _l, name in PAGE_CHOICES] == [k.name for k in KINDS.values() if k.on_page]
    assert [name for _l, name in BATCH_CHOICES] == ["local", "openai"]
    assert researcher_types("researcher") and not researcher_types("local") and not researcher_types(None)
    assert needs_endpoint("openai") and not needs_endpoint("local") and not needs_endpoint(["openai"])
    for cli in ("usersim_ui.simulate", "usersim_ui.batch"):
        out = subprocess.run([sys.executable, "-m", cli, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})
        assert SPEC_FORMS in out.stdout, (cli, out.stdout[-800:], out.stderr[-800:])


def test_a_new_kind_is_a_row(monkeypatch):
    """A row is all a spec string, the help, the choices and the model-lock rule need."""
    echo = AssistantKind("echo", "Echo (repeats the user)", lambda spec: None, uses_local_model=True,
                         spec_parts=("model",))
    monkeypatch.setitem(KINDS, "echo", echo)
    spec = parse_spec("echo:loud")
    assert (spec.kind, spec.model, spec_text(spec)) == ("echo", "loud", "echo:loud")
    assert kind_of(spec).uses_local_model  # the batch CLI serialises it behind the model lock
    assert echo.spec_forms == ["echo:MODEL"] and registry.make_backend(spec) is None


def test_a_bad_spec_stops_the_batch_cli_before_it_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "usersim_ui.batch", "--intents", "sample", "--assistant", "openai:",
                          "--out", str(tmp_path / "x.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--assistant: assistant 'openai:': use openai:URL:MODEL" in out.stderr
    assert not (tmp_path / "x.jsonl").exists()
