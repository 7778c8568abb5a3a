"""The launched app driven over its API with gradio_client: a whole run on the offline
defaults, and what happens when a researcher's actions overlap (two threads of one session,
two sessions), fail, or exceed a limit. Each test checks the dialogue afterwards."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from loopback_openai import LoopbackOpenAI

from usersim_ui.app.handlers import START_TEXT

gradio_client = pytest.importorskip("gradio_client")

SETTINGS = dict(temperature=1.0, top_p=0.8, max_new_tokens=16, seed=0, max_turns=2, first_token=True,
                no_early_end=True, min_turns_end=0, length=True, min_words=1, max_words=1000, repetition=True,
                retry_cap=2)
BACKEND = dict(backend_kind="local", system_prompt="Be brief.", a_temperature=0.7, a_max_tokens=16,
               base_url="", model_name="", api_key="")
INTENT = "You want to know how long before bedtime you should stop drinking coffee."


@pytest.fixture(scope="module")
def app_url(smollm2):
    from usersim_ui.app.studio import build_app

    demo = build_app().queue(default_concurrency_limit=1)
    _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def trickle():
    server = LoopbackOpenAI("trickle", delay_s=0.15, words=40)  # a 6 s reply
    yield server
    server.close()


def args(**overrides):
    values = {**SETTINGS, **BACKEND, **overrides}
    return [values[k] for k in SETTINGS], [values[k] for k in BACKEND]


def refused(action, reason: str) -> None:
    """A refusal reaches an API caller as an error that carries its reason (the dialogue is kept)."""
    with pytest.raises(gradio_client.exceptions.AppError, match=reason):
        action()


def call(client, api_name, intent=INTENT, **overrides):
    settings, backend = args(**overrides)
    return client.predict(intent, *settings, *backend, api_name=api_name)


def submit(client, api_name, intent=INTENT, **overrides):
    settings, backend = args(**overrides)
    return client.submit(intent, *settings, *backend, api_name=api_name)


def dialogue_of(client) -> dict | None:
    """The session's dialogue as exported, or None when there is nothing to export."""
    try:
        return json.loads(Path(client.predict(api_name="/export_jsonl")).read_text().splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - gradio_client wraps the app's error
        assert "Nothing to export" in str(exc)
        return None


def texts(record) -> list[str]:
    return [m["content"] for m in record["messages"]] if record else []


def via(trickle_server, **extra):
    return dict(backend_kind="openai", base_url=trickle_server.url, model_name="loopback", **extra)


def wait_for_turns(client, n: int, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = dialogue_of(client)
        if record and len(record["messages"]) >= n:
            return record
        time.sleep(0.2)
    raise AssertionError(f"no {n} turns within {timeout} s")


def test_auto_run_through_the_api_gives_dialogue_charts_and_export(app_url):
    client = gradio_client.Client(app_url, verbose=False)
    chat, banner, lengths, p_end, summary, transcript = call(client, "/auto_run")
    user_bubbles = [m for m in chat if m["role"] == "user" and not (m.get("metadata") or {}).get("title")]
    badges = [m["metadata"]["title"] for m in chat if (m.get("metadata") or {}).get("title")]
    assert "Dialogue over" in banner and len(user_bubbles) >= 1
    assert badges[0].startswith("#1 · Simulated user · P(end)")
    assert "Turn lengths" in json.dumps(lengths) and ("**Ended by the turn cap**" in summary or "**Ended by the simulated user" in summary) and "**Intent:**" in transcript
    record = dialogue_of(client)
    assert record["intent"] == INTENT and record["ended_by"] in {"user", "turn_cap"}
    assert [m["role"] for m in record["messages"]][:2] == ["user", "assistant"]
    assert all(t["seed"] is not None for t in record["turns"])


def test_edits_sent_during_a_run_are_refused_and_the_run_keeps_its_turns(app_url, trickle):
    """Issue case 1: Send reply, Edit, Undo and Import while a run is in flight."""
    client = gradio_client.Client(app_url, verbose=False)
    job = submit(client, "/step", **via(trickle))  # a user turn, then a 6 s assistant reply
    wait_for_turns(client, 1)
    before = dialogue_of(client)
    settings, _backend = args()
    refused(lambda: client.predict(INTENT, "typed over the run", *settings, api_name="/send_reply"),
            "Sending a reply is not possible while a run is in flight")
    refused(lambda: client.predict(1, "edited during the run", api_name="/edit_turn"), "Editing a turn is not possible")
    refused(lambda: client.predict(api_name="/undo"), "Undo is not possible")
    assert dialogue_of(client) == before  # nothing applied while the run is in flight
    job.result(timeout=60)
    after = dialogue_of(client)
    assert len(after["messages"]) == 2 and texts(after)[0] == texts(before)[0]
    assert "typed over the run" not in texts(after) and "edited during the run" not in texts(after)
    assert texts(after)[1].startswith("w0 w1")  # the run's reply, not overwritten by anything


def test_reset_and_end_during_a_run_are_the_runs_last_word(app_url, trickle):
    """Issue case 1: Reset during Auto-run is not undone when the run finishes; End ends it."""
    client = gradio_client.Client(app_url, verbose=False)
    job = submit(client, "/auto_run", **via(trickle), max_turns=5)
    wait_for_turns(client, 1)
    out = client.predict("A new intent after reset.", api_name="/reset")
    assert out[1] == START_TEXT  # the fresh dialogue's status line
    job.result(timeout=60)
    time.sleep(0.5)
    assert dialogue_of(client) is None  # still reset after the run wound down
    job = submit(client, "/auto_run", **via(trickle), max_turns=5)
    wait_for_turns(client, 1)
    client.predict(api_name="/end_dialogue")
    job.result(timeout=60)
    record = dialogue_of(client)
    assert record["ended_by"] == "researcher" and len(record["messages"]) <= 2


def test_a_second_run_in_the_same_session_is_refused(app_url, trickle):
    client = gradio_client.Client(app_url, verbose=False)
    job = submit(client, "/auto_run", **via(trickle), max_turns=2)
    wait_for_turns(client, 1)
    refused(lambda: call(client, "/step", **via(trickle)), "already in flight")
    client.predict(api_name="/stop")
    job.result(timeout=30)
    assert len(dialogue_of(client)["messages"]) <= 2


def test_stop_reaches_a_run_that_waits_for_the_model(app_url):
    """Issue case 2: another session holds the model; Stop ends the queued run at once."""
    from usersim_ui.app.handlers import RUNS

    client = gradio_client.Client(app_url, verbose=False)
    with RUNS.start("another-session") as other, RUNS.model_slot(other):
        job = submit(client, "/auto_run")
        deadline = time.time() + 10
        while not job.status().code.name == "PROCESSING" and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        stopped = time.perf_counter()
        client.predict(api_name="/stop")
        outputs = job.result(timeout=10)
        took = time.perf_counter() - stopped
    assert took < 3 and "Stopped" in outputs[1]
    assert dialogue_of(client) is None  # no turn was made


def test_an_endpoint_turn_takes_no_model_slot_so_other_sessions_go_on(app_url):
    """Issue cases 3 and 7: a trickling endpoint does not hold the model for everyone."""
    slow = LoopbackOpenAI("trickle", delay_s=0.75, words=80)  # a 60 s reply
    try:
        alice = gradio_client.Client(app_url, verbose=False)
        bob = gradio_client.Client(app_url, verbose=False)
        call(alice, "/next_user_turn")
        job = submit(alice, "/next_assistant_turn", **via(slow))
        while not slow.requests:
            time.sleep(0.1)
        call(bob, "/next_user_turn")  # a model turn, while Alice's endpoint turn is streaming
        assert not job.done() and len(texts(dialogue_of(bob))) == 1
        alice.predict(api_name="/stop")
        job.result(timeout=30)
        assert len(texts(dialogue_of(alice))) == 1 and dialogue_of(bob)["intent"] == INTENT
    finally:
        slow.close()


def test_refusals_leave_every_output_and_a_raised_cap_reopens(app_url):
    """Issue case 4."""
    client = gradio_client.Client(app_url, verbose=False)
    call(client, "/auto_run", max_turns=1)
    record = dialogue_of(client)
    assert record["ended_by"] == "turn_cap" and len(record["messages"]) == 2
    refused(lambda: call(client, "/step", max_turns=1), "turn cap")  # over: refused, nothing blanked
    refused(lambda: call(client, "/next_assistant_turn", max_turns=2, backend_kind="researcher"), "It is the user's turn")
    out = call(client, "/next_user_turn", max_turns=2)
    assert "Next: the **assistant**" in out[1] and len(dialogue_of(client)["messages"]) == 3
    assert dialogue_of(client)["ended_by"] is None


def test_regenerate_draws_a_new_seed_every_time_and_stop_keeps_the_original(app_url, trickle):
    """Issue case 5."""
    client = gradio_client.Client(app_url, verbose=False)
    call(client, "/next_user_turn")
    seeds = [dialogue_of(client)["turns"][0]["seed"]]
    for _ in range(2):
        call(client, "/regenerate")
        seeds.append(dialogue_of(client)["turns"][0]["seed"])
    assert len(set(seeds)) == 3
    call(client, "/next_assistant_turn", **via(trickle, a_max_tokens=16))
    original = dialogue_of(client)
    job = submit(client, "/regenerate", **via(trickle))
    time.sleep(1.0)
    client.predict(api_name="/stop")
    job.result(timeout=30)
    assert dialogue_of(client) == original  # the original reply is still there


def test_temperature_zero_huge_seeds_and_empty_boxes(app_url):
    """Issue case 6."""
    client = gradio_client.Client(app_url, verbose=False)
    out = call(client, "/step", temperature=0.0, seed=2 * 10**13, max_words=3)
    record = dialogue_of(client)
    assert len(record["messages"]) == 2 and "Next: the **user**" in out[1]
    assert record["turns"][0]["sampling"]["temperature"] == 0.0
    assert record["turns"][1]["seed"] is not None
    refused(lambda: call(client, "/step", seed=None), "(?i)seed")
    assert len(dialogue_of(client)["messages"]) == 2


def test_a_garbage_endpoint_is_an_error_on_that_turn_and_the_dialogue_is_kept(app_url):
    """Issue case 7."""
    garbage = LoopbackOpenAI("garbage")
    try:
        client = gradio_client.Client(app_url, verbose=False)
        call(client, "/next_user_turn")
        before = dialogue_of(client)
        out = call(client, "/next_assistant_turn", **via(garbage))
        assert "loopback @" in out[1] and "The dialogue so far is kept" in out[1]
        assert dialogue_of(client) == before
    finally:
        garbage.close()


def test_size_limits_have_clear_refusals(app_url, tmp_path):
    """Issue case 8: a 9,000-word typed turn, a huge import, an over-long intent."""
    client = gradio_client.Client(app_url, verbose=False)
    call(client, "/next_user_turn", backend_kind="researcher")
    settings, _ = args()
    refused(lambda: client.predict(INTENT, "word " * 9000, *settings, api_name="/send_reply"), "the limit is 8,000")
    assert len(dialogue_of(client)["messages"]) == 1
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"intent": "x", "messages": [{"role": "user", "content": "a" * 6_000_000}]}))
    long_intent = tmp_path / "intent.jsonl"
    long_intent.write_text(json.dumps({"intent": "x" * 5000, "messages": []}))
    for path in (big, long_intent):
        refused(lambda: client.predict(gradio_client.handle_file(str(path)), api_name="/import_jsonl"), "Could not import")
    assert len(dialogue_of(client)["messages"]) == 1


MALFORMED = [{"intent": "x", "messages": ["a"]},
             {"intent": "x", "messages": [], "ended_by": "aliens"},
             {"intent": "x", "messages": [{"role": "user", "content": "a"}], "turns": [{"p_end": "high"}]},
             {"intent": "x", "messages": [{"role": "user", "content": "a"}], "turns": [{"tokens": "many"}]},
             {"intent": "x", "messages": [{"role": "user", "content": "a"}], "turns": [{"words": [3]}]},
             {"intent": "x", "messages": [{"role": "user", "content": "a"}], "turns": [{"latency_s": "slow"}]}]


@pytest.mark.parametrize("record", MALFORMED)
def test_each_malformed_record_is_refused_with_line_and_field(app_url, tmp_path, record, caplog):
    client = gradio_client.Client(app_url, verbose=False)
    call(client, "/next_user_turn")
    before = dialogue_of(client)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"intent": "fine", "messages": []}) + "\n" + json.dumps(record) + "\n")
    with caplog.at_level(logging.INFO, logger="usersim_ui"):
        refused(lambda: client.predict(gradio_client.handle_file(str(path)), api_name="/import_jsonl"),
                "Could not import: line 2: field '")
    refusals = [r for r in caplog.records if "refused import_jsonl" in r.getMessage()]
    assert len(refusals) == 1 and "line 2: field '" in refusals[0].getMessage() and refusals[0].exc_info is None
    assert dialogue_of(client) == before


def test_exports_replace_each_other_in_the_sessions_folder_which_goes_with_the_session(app_url):
    """Issue case 10: one file per session at a time, removed when the session is released."""
    from usersim_ui.app import handlers

    client = gradio_client.Client(app_url, verbose=False)
    call(client, "/next_user_turn")
    client.predict(api_name="/export_jsonl")
    client.predict(api_name="/export_jsonl")
    folder = handlers.EXPORT_ROOT / handlers._safe_name(client.session_hash)
    assert [p.suffix for p in folder.iterdir()] == [".jsonl"]
    handlers.RUNS.forget(client.session_hash)  # what the page's unload does
    assert not folder.exists()


def test_every_gallery_example_loads_in_one_call_and_names_its_models(app_url):
    from usersim_ui.app.examples import load_examples

    examples = load_examples()
    assert len(examples) >= 3
    client = gradio_client.Client(app_url, verbose=False)
    for index, example in enumerate(examples):
        out = client.predict(index, api_name="/load_example")
        assert out[-1] == example.dialogue.intent and f"#{len(example.dialogue.turns)} ·" in json.dumps(out[0], ensure_ascii=False)
        record = dialogue_of(client)
        assert record["id"] == example.dialogue.id and record["user_model"] and record["assistant_model"]
        # honest labels: the offline examples were made by the prompted baseline, and say so
        assert "prompted user baseline" in record["user_model"] or "UserLM" in record["user_model"]
