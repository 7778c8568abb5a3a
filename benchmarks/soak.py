"""Soak: the launched app on the offline defaults, N concurrent gradio_client sessions
auto-running dialogues (each session its own intent) against an OpenAI-compatible assistant
on loopback that is killed and restarted midway.

Checked at the end (``check(report)``): no lost turn (each session's export holds every turn
its last reply showed), no cross-session leak (each export has its session's intent), errors
only on runs that overlapped the assistant's death and that name the endpoint, RSS at the end
within 15% of RSS after warm-up. Reported: the p50/p95 wait of a queued run for the model
(``usersim_ui.app.handlers.RUNS.waits_s``).

Each session is its own visitor (its own X-Forwarded-For address, which uvicorn trusts from
loopback). With ``--hostile N`` one more visitor opens N sessions whose runs wait on endpoints
that trickle one byte a second or stay silent, pressing Stop after 1-3 s, again and again:
then also checked that no normal session's run was refused or failed for it, that the hostile
visitor never held more than its cap of runs, and that each Stop ended its run within a second.

    python -m benchmarks.soak --sessions 8 --duration 300
    python -m benchmarks.soak --sessions 8 --hostile 6 --duration 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_EVERY_S = 10.0  # RSS time series
SETTINGS = dict(temperature=1.0, top_p=0.8, max_new_tokens=12, seed=0, max_turns=2, first_token=True,
                no_early_end=True, min_turns_end=0, length=True, min_words=1, max_words=1000, repetition=True,
                retry_cap=1)
BACKEND = dict(backend_kind="openai", system_prompt="Be brief.", a_temperature=0.7, a_max_tokens=16,
               base_url="", model_name="loopback", api_key="")
TOPICS = ["plan a weekend in Lisbon", "fix a leaking tap", "learn the basics of chess", "bake rye bread",
          "choose a first telescope", "write a cover letter", "start running at 40", "repot an orchid",
          "set up a budget spreadsheet", "train a puppy to sit", "pick a laptop for coding", "brew cold coffee"]


# ---- the assistant: a loopback OpenAI server in its own process, on a fixed port ----------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_assistant(port: int, delay_s: float, words: int) -> None:
    """Run tests/loopback_openai's trickle handler on ``port`` until killed."""
    from http.server import ThreadingHTTPServer

    sys.path.insert(0, str(ROOT / "tests"))
    from loopback_openai import LoopbackOpenAI

    template = LoopbackOpenAI("trickle", delay_s=delay_s, words=words)
    handler = template.server.RequestHandlerClass
    template.close()
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.serve_forever()


class Assistant:
    """The assistant process: start, kill (SIGKILL: in-flight replies are cut), restart on the same port."""

    def __init__(self, port: int, delay_s: float = 0.02, words: int = 8):
        self.port, self.delay_s, self.words = port, delay_s, words
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None
        self.down: list[tuple[float, float]] = []  # (killed at, back at) in time.monotonic()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.soak", "--serve-assistant", str(self.port),
                                      "--delay", str(self.delay_s), "--words", str(self.words)], cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the loopback assistant did not come up")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        self.down.append((time.monotonic(), float("inf")))

    def restart(self) -> None:
        self.start()
        self.down[-1] = (self.down[-1][0], time.monotonic())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


# ---- sessions ------------------------------------------------------------------------------

@dataclass
class RunRecord:
    session: int
    started: float
    ended: float
    banner: str
    shown: list[tuple[str, str]]  # (role, content) of the turn bubbles the last reply showed
    exported: dict | None
    refused: bool = False


@dataclass
class SessionLog:
    intent: str
    runs: list[RunRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # exceptions raised to the client


def text_of(content: Any) -> str:
    """A Chatbot message's content as text (gradio returns content-block lists)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(text_of(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    return str(content)


def bubbles(chat: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m["content"])) for m in chat if not (m.get("metadata") or {}).get("title")]


def export_of(client: Any) -> dict | None:
    try:
        return json.loads(Path(client.predict(api_name="/export_jsonl")).read_text().splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - gradio_client wraps the app's error
        if "Nothing to export" in str(exc):
            return None
        raise


def connect(url: str, address: str, attempts: int = 5) -> Any:
    """A gradio_client session from ``address``; retried, since on a saturated machine the
    app may not answer the client's first requests within httpx's default 5 s."""
    import gradio_client

    for attempt in range(attempts):
        try:
            return gradio_client.Client(url, verbose=False, headers={"X-Forwarded-For": address},
                                        httpx_kwargs={"timeout": 60})
        except Exception:  # noqa: BLE001 - retried, then raised
            if attempt == attempts - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def visitor_address(index: int) -> str:
    """Each soak session is its own visitor (RunControl caps runs per client address)."""
    return f"10.77.{index // 250}.{index % 250 + 1}"


def session_loop(index: int, url: str, assistant_url: str, deadline: float, log: SessionLog) -> None:
    from gradio_client.exceptions import AppError

    try:
        client = connect(url, visitor_address(index))
    except Exception as exc:  # noqa: BLE001 - recorded and asserted on
        log.errors.append(f"could not connect: {type(exc).__name__}: {exc}")
        return
    values = {**SETTINGS, **BACKEND, "base_url": assistant_url, "seed": index}
    settings, backend = [values[k] for k in SETTINGS], [values[k] for k in BACKEND]
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            try:
                out = client.predict(log.intent, *settings, *backend, api_name="/auto_run")
            except AppError as exc:  # a refusal reaches an API caller as an error with its reason
                log.runs.append(RunRecord(index, started, time.monotonic(), str(exc), [], export_of(client), True))
                time.sleep(0.5)
                continue
            ended = time.monotonic()
            chat, banner = out[0], out[1]
            log.runs.append(RunRecord(index, started, ended, banner or "", bubbles(chat or []), export_of(client)))
            client.predict(log.intent, api_name="/reset")  # a fresh dialogue for the next run
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on
            log.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.5)


# ---- a hostile visitor ---------------------------------------------------------------------

HOSTILE_ADDRESS = "203.0.113.66"


@dataclass
class HostileLog:
    stops_s: list[float] = field(default_factory=list)  # Stop pressed -> its run's reply received by the client
    release_s: list[float] = field(default_factory=list)  # Stop reached the server -> the run's slot free
    refused: int = 0  # runs refused (the visitor's cap)
    runs: int = 0
    errors: list[str] = field(default_factory=list)
    most_in_flight: int = 0  # the visitor's runs holding a slot, sampled


def hostile_loop(index: int, url: str, endpoint_url: str, deadline: float, log: HostileLog, seed: int) -> None:
    """One of the hostile visitor's sessions: a run that waits on ``endpoint_url`` (a byte a
    second, or silence), Stop after 1-3 s, and again."""
    import random
    import tempfile

    import gradio_client
    from gradio_client.exceptions import AppError

    rng = random.Random(seed)
    try:
        client = connect(url, HOSTILE_ADDRESS)
    except Exception as exc:  # noqa: BLE001 - recorded and asserted on
        log.errors.append(f"could not connect: {type(exc).__name__}: {exc}")
        return
    start = Path(tempfile.mkdtemp()) / "start.jsonl"
    start.write_text(json.dumps({"intent": "You want a slow answer.",
                                 "messages": [{"role": "user", "content": "Tell me something, slowly."}]}))
    client.predict(gradio_client.handle_file(str(start)), api_name="/import_jsonl")
    values = {**SETTINGS, **BACKEND, "base_url": endpoint_url, "model_name": "hostile"}
    settings, backend = [values[k] for k in SETTINGS], [values[k] for k in BACKEND]
    while time.monotonic() < deadline:
        job = client.submit("You want a slow answer.", *settings, *backend, api_name="/next_assistant_turn")
        time.sleep(rng.uniform(1.0, 3.0))
        log.runs += 1
        stopped = time.monotonic()
        if not job.done():
            client.predict(api_name="/stop")
        try:
            job.result(timeout=30)
            log.stops_s.append(time.monotonic() - stopped)
        except AppError as exc:
            if "one visitor" in str(exc):  # refused: the visitor's cap (its reply may come late on a busy server)
                log.refused += 1
            else:
                log.errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on
            log.errors.append(f"{type(exc).__name__}: {exc}")


# ---- the soak ------------------------------------------------------------------------------

def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_soak(sessions: int = 8, duration_s: float = 300.0, kill_at: float = 0.4, down_s: float = 5.0,
             warmup_s: float | None = None, hostile: int = 0) -> dict[str, Any]:
    """Run the soak and return its report (see :func:`check`); ``hostile``: sessions of one
    hostile visitor whose runs wait on a trickling or a silent endpoint."""
    from usersim_ui.app import handlers
    from usersim_ui.app.studio import build_app
    from usersim_ui.app.zerogpu import simulator

    sys.path.insert(0, str(ROOT / "tests"))
    from hostile_endpoint import HostileEndpoint

    simulator()  # load the offline models before the clock starts
    assistant = Assistant(free_port())
    assistant.start()
    bad = [HostileEndpoint("bytes"), HostileEndpoint("silent")] if hostile else []
    demo = build_app().queue(default_concurrency_limit=sessions + hostile + 2)
    _app, url, _share = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    logs = [SessionLog(f"You want to {TOPICS[i % len(TOPICS)]} (session {i}).") for i in range(sessions)]
    hostile_log = HostileLog()
    begin = time.monotonic()
    deadline = begin + duration_s
    threads = [threading.Thread(target=session_loop, args=(i, url, assistant.url, deadline, logs[i]), daemon=True)
               for i in range(sessions)]
    threads += [threading.Thread(target=hostile_loop, daemon=True,
                                 args=(i, url, bad[i % 2].url, deadline, hostile_log, i)) for i in range(hostile)]
    waits_before, releases_before = len(handlers.RUNS.waits_s), len(handlers.RUNS.stop_release_s)
    rss: dict[str, float] = {"start": rss_mb()}
    series: list[tuple[float, int, int]] = []  # (s since start, RSS MB, live threads)
    try:
        for t in threads:
            t.start()
        # warm: every session has finished a run (each code path, thread and cache has been used once),
        # or at the latest half-way
        latest_warm = begin + (warmup_s if warmup_s is not None else duration_s * 0.5)
        killed, next_sample = False, begin
        while any(t.is_alive() for t in threads):
            now = time.monotonic()
            if now >= next_sample:
                series.append((round(now - begin, 1), round(rss_mb()), threading.active_count()))
                next_sample += SAMPLE_EVERY_S
            if "warm" not in rss and (now >= latest_warm or (warmup_s is None and all(log.runs for log in logs))):
                rss["warm"] = rss_mb()
                rss["warm_at_s"] = now - begin
            if hostile:
                hostile_log.most_in_flight = max(hostile_log.most_in_flight, handlers.RUNS.runs_of(HOSTILE_ADDRESS))
            if not killed and now >= begin + duration_s * kill_at:
                assistant.kill()
                killed = True
                time.sleep(down_s)
                assistant.restart()
            time.sleep(0.2)
        for t in threads:
            t.join()
        rss["end"] = rss_mb()
        series.append((round(time.monotonic() - begin, 1), round(rss["end"]), threading.active_count()))
    finally:
        assistant.stop()
        for endpoint in bad:
            endpoint.close()
        demo.close()
    waits = list(handlers.RUNS.waits_s)[waits_before:]
    hostile_log.release_s = list(handlers.RUNS.stop_release_s)[releases_before:]
    q = statistics.quantiles(waits, n=20) if len(waits) >= 2 else [0.0] * 19
    return {"sessions": sessions, "duration_s": duration_s, "logs": logs, "down": assistant.down, "rss_mb": rss,
            "rss_series": series,
            "waits": len(waits), "wait_p50_s": statistics.median(waits) if waits else 0.0, "wait_p95_s": q[18],
            "runs": sum(len(log.runs) for log in logs),
            "turns": sum(len(r.exported["messages"]) for log in logs for r in log.runs if r.exported),
            "hostile": hostile_log if hostile else None, "per_visitor": handlers.RUNS.per_visitor}


def check(report: dict[str, Any], grace_s: float = 2.0) -> list[str]:
    """Every violation of the soak's promises (an empty list: all held)."""
    problems: list[str] = []
    down = report["down"]
    for log in report["logs"]:
        problems += [f"session '{log.intent}': client error {e}" for e in log.errors]
        for run in log.runs:
            where = f"session {run.session} run at {run.started:.1f}"
            if run.refused:
                problems.append(f"{where}: refused")
                continue
            exported = run.exported
            shown = run.shown
            if exported is None:
                if shown:
                    problems.append(f"{where}: showed {len(shown)} turns, exported none (lost)")
                continue
            if exported["intent"] != log.intent:
                problems.append(f"{where}: leak: exported intent {exported['intent']!r}")
            roles = [m["role"] for m in exported["messages"]]
            if [r for r, _ in shown] != roles:
                problems.append(f"{where}: lost turns: showed {len(shown)} ({[r for r, _ in shown]}), "
                                f"exported {len(roles)} ({roles})")
            for (role, content), message in zip(shown, exported["messages"]):
                if role == "assistant" and message["content"].split()[:1] != content.split()[:1]:
                    problems.append(f"{where}: turn text differs: {content[:40]!r} vs {message['content'][:40]!r}")
            if "⚠" in run.banner:
                overlaps = any(run.started <= back + grace_s and run.ended >= dead for dead, back in down)
                if "loopback @" not in run.banner or not overlaps:
                    problems.append(f"{where}: an error that is not the dead endpoint's: {run.banner[:200]!r}")
    bad: HostileLog | None = report.get("hostile")
    if bad is not None:
        problems += [f"hostile visitor: {e}" for e in bad.errors]
        p95 = statistics.quantiles(bad.release_s, n=20)[18] if len(bad.release_s) >= 2 else 0.0
        if p95 > 1.0:
            problems.append(f"hostile visitor: Stop freed the run slot in {p95:.2f} s at p95 (> 1 s)")
        if bad.most_in_flight > report["per_visitor"] > 0:
            problems.append(f"hostile visitor held {bad.most_in_flight} runs at once (cap {report['per_visitor']})")
        if not bad.stops_s:
            problems.append("hostile visitor: no run was stopped (the soak did not exercise it)")
    for log in report["logs"]:
        if not any(not r.refused for r in log.runs):
            problems.append(f"session '{log.intent}' was never served")
    rss = report["rss_mb"]
    if "warm" in rss and rss["end"] > rss["warm"] * 1.15:
        problems.append(f"RSS grew from {rss['warm']:.0f} MB after warm-up to {rss['end']:.0f} MB (> 15%)")
    return problems


def summary(report: dict[str, Any]) -> str:
    errors = sum("⚠" in r.banner for log in report["logs"] for r in log.runs)
    rss = report["rss_mb"]
    return (f"{report['sessions']} sessions x {report['duration_s']:.0f} s: {report['runs']} auto-runs, "
            f"{report['turns']} turns exported, {errors} runs ended on the dead endpoint "
            f"(assistant down {[round(b - a, 1) for a, b in report['down']]} s); "
            f"RSS {rss.get('start', 0):.0f} MB at start, {rss.get('warm', float('nan')):.0f} MB after warm-up "
            f"(at {rss.get('warm_at_s', float('nan')):.0f} s), "
            f"{rss['end']:.0f} MB at the end; wait for the model over {report['waits']} queued turns: "
            f"p50 {report['wait_p50_s']:.2f} s, p95 {report['wait_p95_s']:.2f} s" + hostile_summary(report))


def hostile_summary(report: dict[str, Any]) -> str:
    bad: HostileLog | None = report.get("hostile")
    if bad is None:
        return ""
    def spread(values: list[float]) -> str:
        if not values:
            return "none"
        p95 = statistics.quantiles(values, n=20)[18] if len(values) >= 2 else values[0]
        return f"p50 {statistics.median(values):.2f} s, p95 {p95:.2f} s, max {max(values):.2f} s"
    return (f"; hostile visitor: {bad.runs} runs on a trickling or silent endpoint, {len(bad.stops_s)} stopped "
            f"(Stop on the server to its run slot free: {spread(bad.release_s)}; Stop sent to the reply received "
            f"by the client: {spread(bad.stops_s)}), {bad.refused} refused by the visitor cap, "
            f"at most {bad.most_in_flight} holding a slot at once (cap {report['per_visitor']})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--down", type=float, default=5.0, help="seconds the assistant stays dead")
    parser.add_argument("--hostile", type=int, default=0,
                        help="sessions of one hostile visitor on a trickling or silent endpoint, stopping each run")
    parser.add_argument("--malloc", choices=["limited", "glibc"], default="limited",
                        help="limited: usersim_ui.inference.memory's settings, as app.py applies them; glibc: its defaults")
    parser.add_argument("--serve-assistant", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=0.02, help=argparse.SUPPRESS)
    parser.add_argument("--words", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_assistant is not None:
        serve_assistant(args.serve_assistant, args.delay, args.words)
        return
    if args.malloc == "limited":
        from usersim_ui.inference.memory import limit_malloc_growth

        print(f"malloc: {limit_malloc_growth() or 'left as the environment set it'} (as app.py does)")
    else:
        print("malloc: glibc's defaults")
    report = run_soak(args.sessions, args.duration, down_s=args.down, hostile=args.hostile)
    print(summary(report))
    print("RSS series (s, MB, threads): " + " ".join(f"{t:.0f}:{mb}:{n}" for t, mb, n in report["rss_series"]))
    problems = check(report)
    print("all checks held" if not problems else "PROBLEMS:\n" + "\n".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
