"""The hostile-visitor suite (issue 14, part T): what a stranger on a public Space sends must not
reach the host's key, files or model slot, must not render as HTML or fetch anything, and must
not break or poison the batch files; each test replays a tester's finding.

Real parts throughout: the tiny UserLM-shaped model (real Llama-3 tokenizer), the scripted
assistant, a loopback OpenAI-compatible server that records the Authorization header it gets, the
CLI's own code, and for rendering an independent CommonMark parser plus Debian's chromium.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser_page import wait_for_text

from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailEvent,
    RejectedSample,
    Turn,
    dialogue_to_dict,
)

ROOT = Path(__file__).resolve().parent.parent
HOST_KEY = "sk-host-secret-never-for-visitors"
SETTINGS = [1.0, 0.8, 6, 0, 3, True, True, 0, True, 1, 1000, True, 2]  # settings_from_inputs order


@pytest.fixture
def host_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", HOST_KEY)
    monkeypatch.delenv("USERSIM_TRUSTED_ENDPOINTS", raising=False)
    monkeypatch.delenv("USERSIM_LOCAL_MODELS", raising=False)
    monkeypatch.delenv("USERSIM_PUBLIC", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    return HOST_KEY


def key_recording_server():
    """The loopback endpoint of tests/loopback_openai.py, also noting each request's Authorization."""
    from loopback_openai import LoopbackOpenAI

    server = LoopbackOpenAI("trickle", delay_s=0.0, words=3)
    server.authorizations = []
    handler = server.server.RequestHandlerClass  # a class made for this server alone
    answer = handler.do_POST

    def do_post(self):
        server.authorizations.append(self.headers.get("Authorization"))
        answer(self)
    handler.do_POST = do_post
    return server


@pytest.fixture
def batch_tab(monkeypatch, tmp_path, tiny_sim):
    from usersim_ui.app import batch_tab as tab
    from usersim_ui.app import zerogpu

    monkeypatch.setattr(zerogpu, "_simulator", tiny_sim)
    monkeypatch.setattr(tab, "output_dir", lambda: tmp_path / "out")
    return tab


def one_intent(tmp_path: Path) -> str:
    path = tmp_path / "one.txt"
    path.write_text("You want a cheap flight to Lisbon.\n")
    return str(path)


# ---- 1. the host's key goes only where the host said ----------------------------------------

def test_the_batch_tab_sends_the_hosts_key_only_to_an_endpoint_the_host_trusts(batch_tab, host_key, tmp_path,
                                                                               monkeypatch):
    server = key_recording_server()
    intents = one_intent(tmp_path)
    quiet = dict(progress=lambda *a, **k: None)
    try:  # one assistant turn per batch, so one request each
        batch_tab.run_batch_ui(intents, 1, 1, "openai", server.url, "loopback", [], 6, **quiet)
        assert server.authorizations[-1] != f"Bearer {HOST_KEY}" and HOST_KEY not in str(server.authorizations)
        typed = batch_tab.run_batch_ui(intents, 1, 1, "openai", server.url, "loopback", [], 6, "sk-visitor", **quiet)
        assert typed[0].startswith("1 dialogue in") and server.authorizations[-1] == "Bearer sk-visitor"
        monkeypatch.setenv("USERSIM_TRUSTED_ENDPOINTS", f"https://api.example.com/v1, {server.url}/")
        batch_tab.run_batch_ui(intents, 1, 1, "openai", server.url, "loopback", [], 6, **quiet)
        assert server.authorizations[-1] == f"Bearer {HOST_KEY}"
    finally:
        server.close()
    assert len(server.authorizations) == 3


def test_the_studio_form_routes_urls_and_keys_through_the_trust_boundary(host_key, monkeypatch):
    from usersim_ui.app.form import Form

    def backend(url: str, key: str = "", model: str = "served-model"):
        return Form.parse(SETTINGS, ["openai", "", 0.7, 16, url, model, key]).backend

    assert backend("http://127.0.0.1:9/v1").api_key == ""  # a visitor's URL: no key of the host's
    assert backend("http://127.0.0.1:9/v1", "sk-mine").api_key == "sk-mine"
    monkeypatch.setenv("USERSIM_TRUSTED_ENDPOINTS", "http://127.0.0.1:9/v1")
    assert backend("HTTP://127.0.0.1:9/v1/").api_key == HOST_KEY  # the same base URL, written differently
    assert backend("http://127.0.0.1:9/v2").api_key == ""
    refused = {"javascript:alert(1)": "http://", "http://user:pw@host/v1": "user name or password",
               "http://host/v1 <img>": "spaces, quotes", "file:///etc/passwd": "http://"}
    for url, rule in refused.items():
        with pytest.raises(ValueError, match=rule) as caught:
            backend(url)
        assert "passwd" not in str(caught.value) and "pw@" not in str(caught.value)
    with pytest.raises(ValueError, match="letters, digits"):
        backend("http://127.0.0.1:9/v1", model="<img src=x onerror=alert(1)>")
    with pytest.raises(ValueError, match="printable ASCII"):
        backend("http://127.0.0.1:9/v1", key="sk-a\r\nX-Injected: 1")
    # a public host: the visitor's URL may not point into the host's own network, unless trusted
    monkeypatch.setenv("USERSIM_PUBLIC", "1")
    for url in ("http://127.0.0.1:8000/v1", "http://169.254.169.254/latest", "http://[::1]:8000/v1",
                "http://10.0.0.5/v1", "http://localhost:11434/v1"):
        with pytest.raises(ValueError, match="host's own network"):
            backend(url)
    assert backend("http://127.0.0.1:9/v1").api_key == HOST_KEY


# ---- 4. the host chooses which local models load --------------------------------------------

def test_the_local_model_box_loads_only_the_hosts_models_and_names_no_path(host_key, monkeypatch, tmp_path):
    from usersim_ui.app.form import Form

    def local(model: str):
        return Form.parse(SETTINGS, ["local", "", 0.7, 16, "", model, ""]).backend

    for typed in ("gpt2", "../../../../etc/passwd", str(tmp_path), "microsoft/UserLM-8b"):
        started = time.perf_counter()
        with pytest.raises(ValueError, match="only the models this host allows") as caught:
            local(typed)
        assert time.perf_counter() - started < 0.5  # refused before any load, not in the model slot
        assert typed not in str(caught.value) and "passwd" not in str(caught.value)
    assert local("").model == "" and local("SmolLM2-135M-Instruct").model == ""  # the offline SmolLM2
    mine = tmp_path / "host-model"
    monkeypatch.setenv("USERSIM_LOCAL_MODELS", f"HuggingFaceTB/SmolLM2-360M-Instruct,{mine}")
    assert local(str(mine)).model == str(mine)
    with pytest.raises(ValueError) as caught:
        local("gpt2")
    assert "SmolLM2-360M-Instruct" in str(caught.value) and str(mine) not in str(caught.value)  # its paths stay hidden


def test_a_local_model_that_fails_to_load_is_named_without_its_path_and_not_retried(tmp_path):
    from usersim_ui.assistants.registry import BackendSpec, make_backend
    from usersim_ui.core.errors import BackendError

    broken = tmp_path / "secret-folder" / "model"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("not JSON at all")
    for attempt in range(2):
        started = time.perf_counter()
        with pytest.raises(BackendError) as caught:
            make_backend(BackendSpec(kind="local", model=str(broken)))
        assert "secret-folder" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert time.perf_counter() - started < 0.05  # the second attempt does not load again


# ---- 5. text renders as text: no HTML, no image, no link ------------------------------------

HOSTILE = [
    "<form action=http://127.0.0.1:9/steal><input type=password name=pw><button>Sign in</button></form>",
    "<img src=x onerror=alert(1)> and <b>bold</b>",
    "![pixel](http://127.0.0.1:9/pixel) [click](http://127.0.0.1:9/phish) <http://127.0.0.1:9/auto> www.example.com",
    "a ` lone backtick\n`<img src=http://127.0.0.1:9/span>`",
    "```x`\n<img src=http://127.0.0.1:9/fence-info>\n```",
    "- item\n```\n<img src=http://127.0.0.1:9/list>\n```",
    "$$\n```\n$$<img src=http://127.0.0.1:9/latex>\n```",
    "```mermaid\n<img src=http://127.0.0.1:9/mermaid>\n```",
    "\\`<img src=http://127.0.0.1:9/escaped>`",
]


def hostile_dialogue(pixel: str = "http://127.0.0.1:9") -> Dialogue:
    texts = [t.replace("http://127.0.0.1:9", pixel) for t in HOSTILE]
    events = (GuardrailEvent("first_token", "masked", f"<img src={pixel}/badge onerror=alert(2)><b>b</b>"),
              GuardrailEvent("length", "resampled", f"```\n<img src={pixel}/detail>"))  # a fence after "- length: "
    rejected = (RejectedSample(f"![r]({pixel}/rejected)", "<i>why</i>"),
                RejectedSample(f"y\n```\n<img src={pixel}/after-reason>\n```", "```\nx\n```"))  # a fence in "(*...*)"
    turns = [Turn(role="user" if i % 2 == 0 else "assistant", text=f"T{i} {text}", author="import",
                  guardrails=events if i == 0 else (), rejected=rejected if i == 0 else ())
             for i, text in enumerate(texts)]
    return Dialogue(intent="<form><input type=password name=pw></form> You want to " + f"![i]({pixel}/intent)",
                    turns=tuple(turns))


def rendered(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough").render(markdown)


def test_transcript_badges_and_chat_text_render_no_html_link_or_image():
    from usersim_ui.analysis.transcript import badge_line, to_markdown
    from usersim_ui.app.handlers import chat_messages

    dialogue = hostile_dialogue()
    views = {"transcript": to_markdown(dialogue), "badge": badge_line(dialogue.turns[0])}
    for number, message in enumerate(chat_messages(dialogue)):
        views[f"chat {number}"] = message["content"]
        if "metadata" in message:
            views[f"title {number}"] = message["metadata"]["title"]
    for name, markdown in views.items():
        html = rendered(markdown)
        for tag in ("<img", "<form", "<input", "<a ", "<b>", "<i>", "<button"):
            assert tag not in html, (name, tag, html[:400])
    shown = rendered(views["transcript"])
    assert "&lt;input type=password" in shown and "&lt;img src=x onerror=alert(1)&gt;" in shown  # shown as text
    assert "<code>" in shown or "<pre>" in shown  # code is still code


# ---- 8. batch files: one writer, torn lines, bad intents, stale errors ------------------------

def scripted_jobs(intents: list[tuple[str, str]], samples: int = 1):
    from usersim_ui.batch.runner import Arm, plan
    from usersim_ui.core.intents import SampleIntent

    return plan([SampleIntent(i, i, "", text) for i, text in intents], samples, [Arm("A", "scripted")])


def run_scripted(jobs, out: Path, sim, backend_for=None, **kwargs):
    from usersim_ui.assistants.registry import BackendSpec, make_backend
    from usersim_ui.batch.runner import run_batch
    from usersim_ui.core.dialogue import SamplingSettings
    from usersim_ui.core.guardrails import parse_guardrails
    from usersim_ui.core.transitions import RunSettings

    # no resampling guardrails: what is under test is the file handling, one short turn a dialogue
    settings = RunSettings(guardrails=parse_guardrails("off"), sampling=SamplingSettings(max_new_tokens=4), max_turns=1)
    backend_for = backend_for or (lambda job: make_backend(BackendSpec(kind="scripted")))
    return run_batch(jobs, lambda job: sim, backend_for, lambda job: settings, out, **kwargs)


def hold_lock_in_another_process(out: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from usersim_ui.batch.runner import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_by_name_and_a_dead_writers_lock_is_taken_over(tmp_path, tiny_sim, capsys):
    from usersim_ui.assistants.registry import BackendSpec, make_backend
    from usersim_ui.batch.runner import read_records

    out = tmp_path / "runs" / "shared.jsonl"
    jobs = scripted_jobs([("trip", "You want a cheap flight to Lisbon.")], samples=2)
    # two runs at once on one file: the second is refused, every dialogue is written once
    started, release = threading.Event(), threading.Event()

    class Slow:  # the scripted assistant, held until the second run has tried
        def __init__(self):
            self.inner = make_backend(BackendSpec(kind="scripted"))
            self.name = self.inner.name

        def reply(self, *args, **kwargs):
            started.set()
            release.wait(30)
            return self.inner.reply(*args, **kwargs)
    first = threading.Thread(target=run_scripted, args=(jobs, out, tiny_sim, lambda job: Slow()))
    first.start()
    assert started.wait(30)
    try:
        with pytest.raises(RuntimeError, match=rf"being written by another batch run \(pid {os.getpid()} on "):
            run_scripted(jobs, out, tiny_sim)
    finally:
        release.set()
        first.join(60)
    assert sorted(r["batch"]["key"] for r in read_records(out)) == sorted(j.key for j in jobs)
    assert len(out.read_text().splitlines()) == 2
    # a run in another process: refused with its pid and start time, by the runner and by the CLI
    from usersim_ui.batch import cli
    from usersim_ui.batch.runner import BatchLocked, lock_path

    more = scripted_jobs([("trip", "You want a cheap flight to Lisbon.")], samples=4)
    holder = hold_lock_in_another_process(out)
    try:
        with pytest.raises(BatchLocked, match=rf"pid {holder.pid} on .*, started \d{{4}}-"):
            run_scripted(more, out, tiny_sim)
        code = cli.main(["--intents", "sample", "--max-intents", "1", "--samples", "1", "--out", str(out),
                         "--user-model", "tiny", "--assistant", "scripted", "--no-progress"])
        assert code == 2 and f"pid {holder.pid}" in capsys.readouterr().err  # before any model loads
        assert len(out.read_text().splitlines()) == 2
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays behind, its flock does not
        holder.wait()
    assert lock_path(out).exists()
    result = run_scripted(more, out, tiny_sim)
    assert (result.written, result.skipped) == (2, 2) and not lock_path(out).exists()


def test_a_torn_line_is_quarantined_and_the_run_goes_on(tmp_path, tiny_sim):
    from usersim_ui.batch.runner import read_records, write_reports

    out = tmp_path / "torn.jsonl"
    jobs = scripted_jobs([("trip", "You want a cheap flight to Lisbon."), ("cake", "You want a cake recipe.")])
    run_scripted(jobs[:1], out, tiny_sim)
    good = out.read_text()
    with open(out, "a", encoding="utf-8") as fh:  # a line torn by a crash that still got its newline
        fh.write('{"id": "torn", "intent": "You want\n')
        fh.write("not json at all\n")
        fh.write(good)  # and a second writer's copy of the same dialogue
    result = run_scripted(jobs, out, tiny_sim)  # no ValueError: the run repairs and goes on
    assert result.skipped == 1 and result.written == 1
    records = read_records(out)
    assert [r["batch"]["key"] for r in records] == [j.key for j in jobs]
    assert out.read_text().startswith(good)  # the finished dialogue is untouched
    quarantine = out.with_name("torn.quarantine.jsonl")
    quarantined = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [(q["line"], q["file"]) for q in quarantined] == [(2, out.name), (3, out.name), (4, out.name)]
    assert quarantined[0]["text"] == '{"id": "torn", "intent": "You want' and "second record" in quarantined[2]["reason"]
    write_reports(out, n_boot=20)  # the reports read the repaired file


def test_bad_intents_are_listed_and_skipped_and_never_stop_the_batch(tmp_path, tiny_sim, capsys):
    from usersim_ui.batch import cli
    from usersim_ui.batch.runner import read_records

    lines = [json.dumps({"id": "ok-1", "intent": "You want a cheap flight to Lisbon."}),
             json.dumps({"id": "huge", "intent": "You want " + "x" * 5000}),
             json.dumps({"id": "no-intent", "text": "You want a recipe."}),
             "{not json",
             json.dumps({"id": "ok-1", "intent": "You want the same id again."}),
             json.dumps({"id": "=cmd|' /C calc'!A0", "intent": "You want a formula id."}),
             json.dumps({"id": "ok-2", "intent": "You want a cake recipe."})]
    path = tmp_path / "intents.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "skip.jsonl"
    code = cli.main(["--intents", str(path), "--samples", "1", "--max-turns", "1", "--max-new-tokens", "4",
                     "--out", str(out), "--user-model", "tiny", "--assistant", "scripted", "--no-progress",
                     "--bootstrap", "20"])
    err = capsys.readouterr().err
    assert code == 0 and "line 2: the intent has 5,009 characters" in err and "skipped" in err
    assert sorted(r["batch"]["intent_id"] for r in read_records(out)) == ["ok-1", "ok-2"]
    # an intent the checks never saw (a job made by hand) fails its own dialogue only
    jobs = scripted_jobs([("long", "You want " + "y" * 5000), ("fine", "You want a cake recipe.")])
    result = run_scripted(jobs, tmp_path / "direct.jsonl", tiny_sim)
    assert (result.written, result.failed) == (1, 1)
    # every problem names its line and the rule, never the line's text
    from usersim_ui.batch.runner import read_intents

    found = read_intents(str(path))
    assert [i.id for i in found.intents] == ["ok-1", "ok-2"]
    assert [p.split(":")[0] for p in found.problems] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert "5,009 characters; the limit is 4,000" in found.problems[0] and "no 'intent' text" in found.problems[1]
    assert all("x" * 20 not in p and "calc" not in p for p in found.problems)


def test_an_error_entry_goes_once_its_dialogue_succeeds(tmp_path, tiny_sim):
    from usersim_ui.assistants.registry import BackendSpec, make_backend

    out = tmp_path / "retry.jsonl"
    errors = out.with_name("retry.errors.jsonl")
    jobs = scripted_jobs([("trip", "You want a cheap flight to Lisbon."), ("cake", "You want a cake recipe.")])
    refused = BackendSpec(kind="openai", base_url="http://127.0.0.1:9/v1", model="nobody-listens")

    def flaky(job):  # the first run's "cake" endpoint is down: a real connection refused
        return make_backend(refused if job.intent_id == "cake" else BackendSpec(kind="scripted"))
    first = run_scripted(jobs, out, tiny_sim, flaky)
    assert (first.written, first.failed) == (1, 1)
    assert [json.loads(line)["batch"]["key"] for line in errors.read_text().splitlines()] == ["cake/0/A"]
    second = run_scripted(jobs, out, tiny_sim)
    assert (second.written, second.skipped) == (1, 1)
    assert not errors.exists() or "cake/0/A" not in errors.read_text()


# ---- 11. CSV cells a spreadsheet would run -------------------------------------------------

def test_csv_cells_that_could_be_formulas_are_neutralised_and_numbers_stay_numbers(tmp_path):
    from usersim_ui.batch.runner import write_reports

    intents = ['=HYPERLINK("http://127.0.0.1:9/x","click")', "@SUM(1+1)", "+cmd", "-2+3", "\tx", "-0.5"]
    records = []
    for arm, p_end in (("A", 0.2), ("B", 0.1)):
        for n, intent in enumerate(intents):
            reply = "<form><input type=password></form><img src=http://127.0.0.1:9/report onerror=alert(1)>"
            d = Dialogue(intent=intent, turns=(Turn("user", "=1+1 is my first turn", p_end=p_end), Turn("assistant", reply)),
                         ended_by="turn_cap", id=f"d{n}{arm}")
            records.append({**dialogue_to_dict(d), "batch": {"key": f"i{n}/0/{arm}", "intent_id": f"i{n}", "sample": 0,
                                                              "arm": arm}})
    out = tmp_path / "formula.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_reports(out, n_boot=20)
    rows = list(csv.DictReader(open(out.with_name("formula.dialogues.csv"), encoding="utf-8")))
    cells = [v for row in rows for v in row.values()]
    assert not [c for c in cells if c[:1] in ("=", "@", "+", "\t", "\r")]
    assert [row["intent"] for row in rows[:6]] == ["'" + i for i in intents[:5]] + ["-0.5"]
    assert all(row["first_turn"] == "'=1+1 is my first turn" for row in rows)
    metrics = {row["metric"]: row for row in csv.DictReader(open(out.with_suffix(".csv"), encoding="utf-8"))}
    assert float(metrics["mean_p_end"]["diff"]) == pytest.approx(-0.1)  # a negative number, not text
    # the HTML report shows the same texts as text (a regression guard: the report escapes them)
    report = out.with_suffix(".html").read_text(encoding="utf-8")
    assert "<img src=http://127.0.0.1:9/report" not in report and "<form><input" not in report


# ---- 12. the Batch tab: clear messages, and its folder goes with the session -----------------

def test_the_batch_tab_says_what_is_wrong_with_an_intents_file(batch_tab, tmp_path):
    import gradio as gr

    cases = {"intents.csv": (b"You want x\n", "must end in .jsonl or .txt"),
             "latin1.txt": ("You want a caf\xe9.\n".encode("latin-1"), "not UTF-8 text"),
             "bad.jsonl": (b'{"text": "You want x"}\n[1, 2]\n', "line 1: no 'intent' text.*line 2: not an object"),
             "empty.txt": (b"\n\n", "the file is empty")}
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(gr.Error) as caught:
            batch_tab.run_batch_ui(str(path), 1, 1, "local", "", "", [], 6, progress=lambda *a, **k: None)
        assert re.search(message, caught.value.message), caught.value.message
        assert str(tmp_path) not in caught.value.message
    with pytest.raises(gr.Error) as caught:
        batch_tab.run_batch_ui(None, 10**9, 1, "local", "", "", [], 6, progress=lambda *a, **k: None)
    assert "'Samples per intent' must be between 1 and 20" in caught.value.message


def test_the_batch_tab_lists_skipped_lines_and_its_folder_goes_with_the_session(batch_tab, tmp_path):
    from loopback_openai import LoopbackOpenAI

    from usersim_ui.app.handlers import RUNS

    path = tmp_path / "mixed.txt"
    path.write_text("You want a cheap flight to Lisbon.\n" + "You want " + "z" * 5000 + "\n")
    server = LoopbackOpenAI("trickle", delay_s=0.0, words=3)
    try:
        status, *_, files = batch_tab.run_batch_ui(str(path), 1, 1, "openai", server.url, "loopback", [], 6,
                                                   progress=lambda *a, **k: None)
        assert "Skipped 1 line of the intents file" in status and "line 2: the intent has 5,009 characters" in status
        first = Path(files[0]).parent
        assert first.exists() and first.parent == tmp_path / "out"
        again = batch_tab.run_batch_ui(str(path), 1, 1, "openai", server.url, "loopback", [], 6,
                                       progress=lambda *a, **k: None)[-1]
    finally:
        server.close()
    second = Path(again[0]).parent
    assert not first.exists() and second.exists()  # the session's next batch replaced it
    RUNS.forget("local")  # the tab closed (or idle past the TTL): what it left goes
    assert not second.exists()


# ---- 5, in a real browser: nothing fetched, nothing live ------------------------------------

class Pixel:
    """A loopback server that counts every request: an image or link the page fetched."""

    def __init__(self):
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.browser
def test_an_imported_hostile_dialogue_fetches_nothing_and_shows_no_form_in_chromium(tmp_path, tiny_sim):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed")
    from usersim_ui.app import zerogpu
    from usersim_ui.app.studio import build_app
    from usersim_ui.core.dialogue import dialogues_to_jsonl

    pixel = Pixel()
    upload = tmp_path / "hostile.jsonl"
    upload.write_text(dialogues_to_jsonl([hostile_dialogue(pixel.url)]), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zerogpu, "_simulator", tiny_sim)
        demo = build_app(max_new_tokens=8, assistant_max_tokens=8, max_turns=2).queue(default_concurrency_limit=1)
        _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless",
                                                                             "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                fetched: list[str] = []
                page.on("request", lambda r: fetched.append(r.url) if r.url.startswith(pixel.url) else None)
                page.goto(url)
                page.get_by_text("Export / import").click()
                page.locator("#import-file input[type=file]").set_input_files(str(upload))
                wait_for_text(page, "#dialogue", "T8", timeout=30_000)
                page.get_by_text("Transcript", exact=True).click()
                wait_for_text(page, "#transcript-view", "T8", timeout=10_000)
                page.wait_for_timeout(1000)
                views = "#dialogue, #transcript-view"
                live = page.locator(f":is({views}) :is(img, form, input, a[href], iframe, object, embed)").count()
                dialogue_text = page.locator("#dialogue").inner_text()
                transcript_text = page.locator("#transcript-view").inner_text()
                browser.close()
        finally:
            demo.close()
    pixel.close()
    assert live == 0
    assert fetched == [] and pixel.paths == []
    assert "<img src=x onerror=alert(1)>" in dialogue_text and "<input type=password" in transcript_text
