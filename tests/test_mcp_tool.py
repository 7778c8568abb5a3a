"""The simulated user as an MCP tool (usersim_ui/app/mcp_tool.py): the app launched in-process
on loopback with ``mcp_server=True`` and the tiny UserLM-shaped model, driven by the ``mcp``
package's own client over Streamable HTTP. The tool's turn must be the turn the core makes
directly with the same seed, made through the page's model slot; bad input comes back as a tool
error that names the problem."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("mcp")

from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamablehttp_client  # noqa: E402

from usersim_ui.core import transitions  # noqa: E402
from usersim_ui.core.dialogue import Dialogue, Turn  # noqa: E402

INTENT = "You want to know how long before bedtime you should stop drinking coffee."
HISTORY = [{"role": "user", "content": "when should i stop coffee before bed"},
           {"role": "assistant", "content": "About six hours before bedtime. Do you drink it late?"}]


@pytest.fixture(scope="module")
def app_url(tiny_sim):
    import usersim_ui.app.zerogpu as zerogpu
    from usersim_ui.app.studio import build_app

    patch = pytest.MonkeyPatch()
    patch.setattr(zerogpu, "_simulator", tiny_sim)
    demo = build_app().queue(default_concurrency_limit=1)
    _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, mcp_server=True)
    yield url.rstrip("/")
    demo.close()
    patch.undo()


def mcp_session(url: str, work):
    """Run ``work(session)`` in one MCP client session against the app (30 s at most)."""
    async def main():
        async with streamablehttp_client(url + "/gradio_api/mcp/", timeout=30) as (read, write, _id):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)
    return asyncio.run(asyncio.wait_for(main(), 60))


def call(url: str, arguments: dict):
    return mcp_session(url, lambda s: s.call_tool("simulated_user_turn", arguments))


def test_the_tool_is_listed_with_its_schema_from_the_docstring(app_url):
    tools = {t.name: t for t in mcp_session(app_url, lambda s: s.list_tools()).tools}
    tool = tools["simulated_user_turn"]
    props = tool.inputSchema["properties"]
    assert set(props) == {"intent", "history", "seed", "temperature", "top_p", "max_new_tokens", "guardrails"}
    assert tool.inputSchema["required"] == ["intent"]
    assert "What the simulated user wants" in props["intent"]["description"]
    assert "ends_dialogue" in tool.description


def test_the_tools_turn_is_the_turn_the_core_makes_with_the_same_seed(app_url, tiny_sim):
    from usersim_ui.app.handlers import RUNS
    from usersim_ui.app.mcp_tool import run_settings

    slot_turns = len(RUNS.waits_s)
    result = call(app_url, {"intent": INTENT, "history": HISTORY, "seed": 7, "max_new_tokens": 16})
    assert not result.isError, result.content
    got = json.loads(result.content[0].text)
    assert len(RUNS.waits_s) == slot_turns + 1  # it took the page's model slot, once

    dialogue = Dialogue(intent=INTENT)
    for m in HISTORY:
        dialogue = dialogue.with_turn(Turn(role=m["role"], text=m["content"]))
    settings = run_settings(seed=7, temperature=1.0, top_p=0.8, max_new_tokens=16, guardrails=True)
    direct = transitions.user_turn(dialogue, tiny_sim, settings).turns[-1]
    assert got["text"] == direct.text and got["ends_dialogue"] == direct.ends_dialogue
    assert got["p_end"] == direct.p_end and got["seed"] == direct.seed
    assert got["guardrails"] == [e.badge() for e in direct.guardrails]
    assert got["model"] == tiny_sim.model_id
    assert 0 < got["p_end"] < 1 and got["text"].strip()
    # another seed, and the history given as JSON text, make another turn
    other = json.loads(call(app_url, {"intent": INTENT, "history": json.dumps(HISTORY), "seed": 8,
                                      "max_new_tokens": 16}).content[0].text)
    assert other["seed"] != got["seed"]


def test_the_first_turn_needs_no_history_and_guardrails_can_be_off(app_url, tiny_sim):
    from usersim_ui.app.mcp_tool import run_settings

    got = json.loads(call(app_url, {"intent": INTENT, "guardrails": False, "max_new_tokens": 8}).content[0].text)
    settings = run_settings(seed=0, temperature=1.0, top_p=0.8, max_new_tokens=8, guardrails=False)
    direct = transitions.user_turn(Dialogue(intent=INTENT), tiny_sim, settings).turns[-1]
    assert (got["text"], got["p_end"], got["guardrails"]) == (direct.text, direct.p_end, [])


@pytest.mark.parametrize("arguments,message", [
    ({"intent": "   "}, "Write a task intent first"),
    ({"intent": "x" * 4001}, "The intent has 4,001 characters; the limit is 4,000"),
    ({"intent": INTENT, "history": HISTORY[:1]}, "ends with a user message"),
    ({"intent": INTENT, "history": [{"role": "system", "content": "obey"}]}, "messages[0].role"),
    ({"intent": INTENT, "history": [{"role": "user", "content": "y" * 8001},
                                    {"role": "assistant", "content": "ok"}]}, "the limit is 8,000"),
    ({"intent": INTENT, "history": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 100},
     "a dialogue holds at most 199"),
    ({"intent": INTENT, "history": "[{\"role\": "}, "The history is not JSON"),
    ({"intent": INTENT, "temperature": 9}, "Temperature"),
    ({"intent": INTENT, "max_new_tokens": 100000}, "Max new tokens"),
    ({"intent": INTENT, "seed": -1}, "seed"),
])
def test_bad_input_is_a_tool_error_that_names_it(app_url, arguments, message):
    from usersim_ui.app.handlers import RUNS

    slot_turns = len(RUNS.waits_s)
    result = call(app_url, arguments)
    assert result.isError and message in result.content[0].text, result.content
    assert len(RUNS.waits_s) == slot_turns  # refused before the model


def test_the_same_endpoint_answers_gradio_client(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    got = json.loads(client.predict(INTENT, HISTORY, 7, 1.0, 0.8, 16, True, api_name="/simulated_user_turn"))
    direct = json.loads(call(app_url, {"intent": INTENT, "history": HISTORY, "seed": 7, "max_new_tokens": 16}).content[0].text)
    assert got == direct


def test_a_tool_call_counts_against_its_callers_runs(monkeypatch):
    """A tool call is its own session but its caller's run: the per-visitor cap refuses it."""
    from types import SimpleNamespace

    import gradio as gr

    from usersim_ui.app import handlers, mcp_tool

    request = SimpleNamespace(client=SimpleNamespace(host="192.0.2.77"))
    monkeypatch.setattr(handlers.RUNS, "per_visitor", 1)
    with handlers.RUNS.start("mcp-cap-holder", "192.0.2.77"):
        with pytest.raises(gr.Error, match="already has 1 runs"):
            mcp_tool.simulated_user_turn("You want a cake recipe.", "[]", request=request)
    handlers.RUNS.forget("mcp-cap-holder")
