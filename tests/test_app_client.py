"""The launched app, driven over its API with gradio_client, on the offline default models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")

SETTINGS = dict(temperature=1.0, top_p=0.8, max_new_tokens=24, seed=0, max_turns=2, first_token=True,
                no_early_end=True, min_turns_end=0, length=True, min_words=3, max_words=25, repetition=True, retry_cap=2)
BACKEND = dict(backend_kind="local", system_prompt="Be brief.", a_temperature=0.7, a_max_tokens=16,
               base_url="", model_name="", api_key="")
INTENT = "You want to know how long before bedtime you should stop drinking coffee."


@pytest.fixture(scope="module")
def app_url(smollm2):
    from usersim_ui.ui import build_app

    demo = build_app().queue(default_concurrency_limit=1)
    _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


def call(client, api_name, **overrides):
    values = {**SETTINGS, **BACKEND, **overrides}
    return client.predict(INTENT, *[values[k] for k in SETTINGS], *[values[k] for k in BACKEND], api_name=api_name)


def test_auto_run_through_the_api_gives_dialogue_charts_and_export(app_url, tmp_path):
    client = gradio_client.Client(app_url, verbose=False)
    chat, banner, lengths, p_end, summary, transcript = call(client, "/auto_run")
    user_msgs = [m for m in chat if m["role"] == "user" and not (m.get("metadata") or {}).get("title")]
    assert "Dialogue over" in banner
    assert len(user_msgs) >= 1 and "p_end" in str(user_msgs[0]["content"])
    figure = json.loads(lengths["plot"]) if isinstance(lengths, dict) and "plot" in lengths else lengths
    assert "Turn lengths" in json.dumps(figure)
    assert "End-of-conversation probability" in json.dumps(p_end)
    assert "**Ended by**" in summary and "**Intent:**" in transcript
    exported = client.predict(api_name="/export_jsonl")
    record = json.loads(Path(exported).read_text().splitlines()[0])
    assert record["intent"] == INTENT and record["ended_by"] in {"user", "turn_cap"}
    assert [m["role"] for m in record["messages"]][:2] == ["user", "assistant"]
    assert all(t["p_end"] is not None for t in record["turns"][::2])


def test_sessions_are_isolated_and_errors_keep_the_dialogue(app_url):
    alice = gradio_client.Client(app_url, verbose=False)
    bob = gradio_client.Client(app_url, verbose=False)
    call(alice, "/next_user_turn")
    with pytest.raises(Exception, match="intent|Write"):
        bob.predict("   ", *SETTINGS.values(), *BACKEND.values(), api_name="/next_user_turn")
    with pytest.raises(Exception, match="base URL"):
        call(alice, "/next_assistant_turn", backend_kind="openai")
    chat, banner, *_rest, transcript = call(alice, "/next_assistant_turn")
    assert transcript.count("**1. user:**") == 1 and "**2. assistant:**" in transcript
    with pytest.raises(Exception, match="Nothing to export"):
        bob.predict(api_name="/export_jsonl")


def test_the_researcher_types_the_assistant_turn(app_url):
    client = gradio_client.Client(app_url, verbose=False)
    call(client, "/next_user_turn", backend_kind="researcher")
    with pytest.raises(Exception, match="You are the assistant"):
        call(client, "/next_assistant_turn", backend_kind="researcher")
    out = client.predict(INTENT, "Stop coffee after 2 pm.", *SETTINGS.values(), api_name="/send_reply")
    transcript = out[5]
    assert "**2. assistant:** Stop coffee after 2 pm." in transcript and "typed by researcher" in transcript
    out = client.predict(2, "Stop coffee by noon.", api_name="/edit_turn")
    assert "**2. assistant:** Stop coffee by noon." in out[-1] and "edited" in out[-1]
    out = client.predict(api_name="/undo")
    assert "**2. assistant:**" not in out[-1]
