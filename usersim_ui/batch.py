"""Batch runs: many simulated dialogues per intent, optionally as an A/B of two assistants or two
guardrail settings, written as resumable JSONL plus a CSV of metrics and a self-contained HTML
report of the distributions.

    python -m usersim_ui.batch --intents sample --samples 3 --assistant local --out runs/base.jsonl
    python -m usersim_ui.batch --intents my_intents.jsonl --samples 20 --assistant local \\
        --guardrails-b first_token=0,no_early_ending=0 --out runs/ab.jsonl --max-turns 6
    python -m usersim_ui.batch --intents sample --samples 50 --assistant openai:http://gpu:8001/v1:llama-3-8b \\
        --user-server http://gpu:8000/v1,http://gpu2:8000/v1 --user-model userlm --concurrency 32 --out runs/big.jsonl

Every finished dialogue is one JSONL line (the app's dialogue record plus a ``batch`` object
with its stable key ``intent_id/sample/arm``, seed and replica); a rerun with the same
``--out`` skips the keys already there, so an interrupted batch resumes where it stopped.
Failed dialogues go to ``NAME.errors.jsonl`` (with the turns made so far) and are retried by
the next run. Both arms of an A/B use the same seed for the same (intent, sample).

Concurrency: the in-process model (``--user-model`` without ``--user-server``, or a local
assistant) is one model on one device behind one lock; with ``--concurrency`` above 1 the user
turns that dialogues in flight wait for at the same time go through it as one batched
``generate()`` call (``turn_batcher``), and the assistant's turns take it one at a time; a simulated
user on completions servers runs ``--concurrency`` dialogues in flight, each pinned to one
replica for all its turns (sha256 of its key modulo the number of servers), which keeps the
server's prefix cache warm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .dialogue import Dialogue, GuardrailSettings, SamplingSettings, dialogue_from_dict, dialogue_to_dict
from .intents import SampleIntent, load_sample_intents
from .turn_batcher import TurnBatcher

GUARDRAIL_ALIASES = {
    "first_token": "first_token_filter", "no_early_ending": "no_early_ending", "length": "length_thresholds",
    "repetition": "verbatim_repetition", "min_turns": "min_user_turns_before_end",
}
SCRIPTED_REPLIES = (
    "Sure, I can help with that. Could you tell me a bit more about what you need?",
    "Thanks, that helps. Here is a first suggestion; tell me what you think.",
    "Good question. There are a few options; which matters most to you?",
    "Understood. Let me refine that for you.",
)


# ---- plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """One side of a run: which assistant answers and which guardrails the user runs with."""

    name: str
    assistant: str = "local"  # local | local:MODEL | openai:URL:MODEL | scripted
    guardrails: GuardrailSettings = field(default_factory=GuardrailSettings)


@dataclass(frozen=True)
class Job:
    key: str
    intent_id: str
    intent: str
    sample: int
    arm: str
    seed: int


def parse_guardrails(spec: str | None, base: GuardrailSettings | None = None) -> GuardrailSettings:
    """``off``, ``on``/``default``, or ``name=value,...`` over ``base`` (names: first_token,
    no_early_ending, length, repetition, min_turns, or any GuardrailSettings field)."""
    base = base or GuardrailSettings()
    spec = (spec or "").strip()
    if spec in ("", "on", "default"):
        return base
    if spec == "off":
        return replace(base, first_token_filter=False, no_early_ending=False, length_thresholds=False,
                       verbatim_repetition=False)
    known = {f.name: f for f in fields(GuardrailSettings)}
    changes: dict[str, Any] = {}
    for item in spec.split(","):
        name, eq, value = item.strip().partition("=")
        name = GUARDRAIL_ALIASES.get(name.strip(), name.strip())
        if not eq or name not in known:
            raise ValueError(f"bad guardrail setting {item!r}; use off, or name=value with name in "
                             f"{', '.join(sorted(set(GUARDRAIL_ALIASES) | set(known)))}")
        value = value.strip()
        current = getattr(base, name)
        if isinstance(current, bool):
            changes[name] = value.lower() in ("1", "true", "on", "yes")
        elif name == "banned_first_words":
            changes[name] = tuple(w for w in value.split("|") if w)
        elif name == "min_user_turns_before_end":
            changes[name] = None if value.lower() in ("", "none") else int(value)
        else:
            changes[name] = int(value)
    return replace(base, **changes)


def sample_seed(base_seed: int, intent_id: str, sample: int) -> int:
    """The seed of one (intent, sample), shared by both arms of an A/B."""
    digest = hashlib.sha256(f"{base_seed}\0{intent_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def job_key(intent_id: str, sample: int, arm: str) -> str:
    return f"{intent_id}/{sample}/{arm}"


def plan(intents: Sequence[SampleIntent], samples: int, arms: Sequence[Arm], base_seed: int = 0) -> list[Job]:
    """Every (intent, sample, arm), arms interleaved so that a partial run holds matched pairs."""
    return [Job(job_key(i.id, s, a.name), i.id, i.intent, s, a.name, sample_seed(base_seed, i.id, s))
            for i in intents for s in range(samples) for a in arms]


def load_intents(source: str) -> list[SampleIntent]:
    """``sample`` (the app's sample intents), a JSONL file (``intent`` and optional ``id``), or a
    text file with one intent per line."""
    if source == "sample":
        return load_sample_intents()
    path = Path(source)
    text = path.read_text(encoding="utf-8")
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            data = json.loads(line)
            intent = data["intent"] if isinstance(data, dict) else str(data)
            iid = str(data.get("id") or f"line{lineno}") if isinstance(data, dict) else f"line{lineno}"
            out.append(SampleIntent(id=iid, title=str(data.get("title", iid)), category=str(data.get("category", "")),
                                    intent=intent))
        else:
            out.append(SampleIntent(id=f"line{lineno}", title=f"line {lineno}", category="", intent=line.strip()))
    ids = [i.id for i in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: intent ids must be unique")
    return out


# ---- the JSONL file -------------------------------------------------------------------------

def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The finished records; a last line cut short by a kill is dropped (and cut off with ``repair``)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw[: raw.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(len(keep))
        raw = keep
    records = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
    return records


def record_key(record: dict[str, Any]) -> str | None:
    batch = record.get("batch")
    return batch.get("key") if isinstance(batch, dict) else None


def arms_from_records(records: Sequence[dict[str, Any]]) -> dict[str, list[Dialogue]]:
    """Dialogues per arm, in the order the arms first appear (A before B)."""
    arms: dict[str, list[Dialogue]] = {}
    for record in sorted(records, key=lambda r: (r["batch"]["arm"], r["batch"]["intent_id"], r["batch"]["sample"])):
        arms.setdefault(record["batch"]["arm"], []).append(dialogue_from_dict(record))
    return arms


# ---- running --------------------------------------------------------------------------------

class Serialised:
    """Calls into one in-process model, one at a time under ``lock``: threads would only fight
    over the same cores. (The app's batch tab does not use this: its turns take the model slot
    in ``events.turn_maker``.)"""

    def __init__(self, inner: Any, lock: threading.Lock):
        self._inner, self._lock = inner, lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate_turn(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._inner.generate_turn(*args, **kwargs)

    def reply(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._inner.reply(*args, **kwargs)


@dataclass
class BatchResult:
    out: Path
    written: int
    skipped: int
    failed: int
    stopped: bool
    elapsed_s: float


def run_batch(jobs: Sequence[Job], simulator_for: Callable[[Job], Any], backend_for: Callable[[Job], Any],
              settings_for: Callable[[Job], Any], out: Path, concurrency: int = 1, limit: int | None = None,
              progress: Callable[[int, int, str], None] | None = None, stop_event: threading.Event | None = None,
              replica_for: Callable[[Job], str | None] = lambda job: None, show_bar: bool = False,
              turn_maker_for: Callable[[Job], Callable[[Dialogue, Any], Dialogue]] | None = None) -> BatchResult:
    """Run every job whose key is not yet in ``out``; append one line per finished dialogue.

    ``limit`` stops after that many new lines (dialogues still running are abandoned, not
    written). ``progress(done, total, key)`` is called after each line. ``turn_maker_for(job)``,
    when given, makes each turn instead of the job's simulator and backend (the app routes
    model turns through its ``@spaces.GPU`` function, so that a batch runs on ZeroGPU too).
    """
    from .engine import auto_run, new_dialogue, run

    out.parent.mkdir(parents=True, exist_ok=True)
    done = {record_key(r) for r in read_records(out, repair=True)}
    pending = [j for j in jobs if j.key not in done]
    skipped = len(jobs) - len(pending)
    stop = stop_event or threading.Event()
    write_lock = threading.Lock()
    errors_path = out.with_name(out.stem + ".errors.jsonl")
    state = {"written": 0, "failed": 0}
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=skipped, unit="dialogue", dynamic_ncols=True)
    started = time.perf_counter()

    def one(job: Job) -> None:
        if stop.is_set():
            return
        simulator, backend, settings = simulator_for(job), backend_for(job), settings_for(job)
        settings = replace(settings, sampling=replace(settings.sampling, seed=job.seed))
        dialogue = new_dialogue(job.intent, simulator, backend)
        dialogue = replace(dialogue, id=re.sub(r"[^A-Za-z0-9_.-]+", "-", job.key))
        t0 = time.perf_counter()
        meta = {"key": job.key, "intent_id": job.intent_id, "sample": job.sample, "arm": job.arm, "seed": job.seed,
                "replica": replica_for(job), "max_turns": settings.max_turns,
                "guardrails": asdict(settings.guardrails), "sampling": asdict(settings.sampling)}
        try:
            turns = (auto_run(dialogue, simulator, backend, settings, stop_event=stop) if turn_maker_for is None
                     else run(dialogue, turn_maker_for(job), lambda: settings))
            for dialogue in turns:
                pass
        except Exception as exc:  # noqa: BLE001 - one failed dialogue must not end the batch
            if stop.is_set():  # stopped (the cancellation, or what it broke): not written, redone on a rerun
                return
            with write_lock:
                state["failed"] += 1
                with open(errors_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({**dialogue_to_dict(dialogue), "batch": {**meta, "error": f"{type(exc).__name__}: {exc}"}},
                                        ensure_ascii=False) + "\n")
            return
        record = {**dialogue_to_dict(dialogue), "batch": {**meta, "elapsed_s": round(time.perf_counter() - t0, 3)}}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with write_lock:
            if stop.is_set() or (limit is not None and state["written"] >= limit):
                return
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            state["written"] += 1
            if bar is not None:
                bar.update(1)
            if progress is not None:
                progress(skipped + state["written"], len(jobs), job.key)
            if limit is not None and state["written"] >= limit:
                stop.set()

    try:
        if concurrency <= 1:
            for job in pending:
                if stop.is_set():
                    break
                one(job)
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                queue = iter(pending)
                running: set[Future] = set()
                for job in queue:  # keep at most `concurrency` in flight, so a stop leaves little behind
                    running.add(pool.submit(one, job))
                    if len(running) >= concurrency:
                        finished, running = wait(running, return_when=FIRST_COMPLETED)
                        for f in finished:
                            f.result()
                    if stop.is_set():
                        break
                for f in running:
                    f.result()
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        if bar is not None:
            bar.close()
    return BatchResult(out, state["written"], skipped, state["failed"], stop.is_set(), time.perf_counter() - started)


# ---- outputs --------------------------------------------------------------------------------

def output_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return {"jsonl": out, "csv": Path(f"{stem}.csv"), "dialogues_csv": Path(f"{stem}.dialogues.csv"),
            "html": Path(f"{stem}.html"), "errors": out.with_name(out.stem + ".errors.jsonl")}


def write_reports(out: Path, title: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics CSV, per-dialogue CSV and the HTML report, all from the JSONL alone."""
    from . import distribution as dist

    records = read_records(out)
    arms = arms_from_records(records)
    table = dist.metrics_table(arms, n_boot=n_boot, seed=seed)
    figs = dist.figures(arms, table)
    paths = output_paths(out)
    table.to_csv(paths["csv"], index=False)
    per = dist.dialogue_table(arms)
    keys = {r["batch"]["key"]: r["batch"] for r in records}
    ids = {dialogue_from_dict(r).id: r["batch"]["key"] for r in records}
    per.insert(0, "key", per["id"].map(ids))
    per.insert(1, "intent_id", per["key"].map(lambda k: keys[k]["intent_id"]))
    per.insert(2, "sample", per["key"].map(lambda k: keys[k]["sample"]))
    per.to_csv(paths["dialogues_csv"], index=False)
    notes = [f"{len(records)} dialogues from {out.name}; arms: " + ", ".join(f"{a} ({len(d)})" for a, d in arms.items())]
    for arm, dialogues in arms.items():
        first = next((r["batch"] for r in records if r["batch"]["arm"] == arm), {})
        notes.append(f"{arm}: user {dialogues[0].user_model}; assistant {dialogues[0].assistant_model}; "
                     f"max turns {first.get('max_turns')}; guardrails {first.get('guardrails')}")
    notes.append(f"Intervals: bootstrap over intents, {n_boot} draws, numpy seed {seed}.")
    paths["html"].write_text(dist.report_html(title or f"UserSim batch: {out.stem}", table, figs, notes), encoding="utf-8")
    return {"paths": paths, "table": table, "figures": figs, "arms": arms, "dialogues": per}


# ---- models ---------------------------------------------------------------------------------

def tiny_simulator() -> Any:
    """The tiny random-weight UserLM-shaped model (tests and smoke runs; its text is noise)."""
    from .model_loading import LoadedModel
    from .prompt_formats import UserLMFormat
    from .simulator import UserSimulator
    from .tiny_userlm import llama3_userlm_tokenizer, tiny_userlm_model

    tok = llama3_userlm_tokenizer()
    return UserSimulator(LoadedModel(tiny_userlm_model(), tok, "tiny-userlm (random weights)", "cpu"), UserLMFormat(tok))


def user_tokenizer_and_format(choice: str | None) -> tuple[Any, Any]:
    """The tokenizer and prompt format of the model a user server runs (ids are built here)."""
    from .prompt_formats import PromptedUserFormat, UserLMFormat

    choice = choice or "userlm"
    if choice == "tiny":
        from .tiny_userlm import llama3_userlm_tokenizer

        tok = llama3_userlm_tokenizer()
        return tok, UserLMFormat(tok)
    if choice == "baseline":
        from .defaults import offline_chat_model

        tok = offline_chat_model().tokenizer
        return tok, PromptedUserFormat(tok)
    from transformers import AutoTokenizer

    from .userlm_format import USERLM_MODEL_ID

    tok = AutoTokenizer.from_pretrained(USERLM_MODEL_ID if choice == "userlm" else choice)
    return tok, UserLMFormat(tok)


def served_model(url: str, timeout_s: float = 10.0) -> str:
    """The first model a server lists at ``/models``."""
    import httpx

    from .backends import BackendError

    try:
        data = httpx.get(url.rstrip("/") + "/models", timeout=timeout_s).json()
        return str(data["data"][0]["id"])
    except Exception as exc:  # noqa: BLE001
        raise BackendError(f"user simulator server {url}: could not list its models ({exc}); pass --user-server-model") from exc


def make_assistant(spec: str, seed: int, max_tokens: int, max_turns: int) -> Any:
    """``local`` / ``local:MODEL`` / ``openai:URL:MODEL`` / ``scripted`` -> a backend."""
    from .backends import ScriptedAssistant
    from .defaults import BackendSpec, make_backend

    if spec == "scripted":
        return ScriptedAssistant([SCRIPTED_REPLIES[i % len(SCRIPTED_REPLIES)] for i in range(max_turns + 1)])
    if spec == "local" or spec.startswith("local:"):
        return make_backend(BackendSpec(kind="local", model=spec.partition(":")[2], max_tokens=max_tokens, seed=seed))
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        url, _, model = rest.rpartition(":")
        if not url or not model:
            raise ValueError(f"--assistant {spec!r}: use openai:URL:MODEL")
        return make_backend(BackendSpec(kind="openai", base_url=url, model=model, max_tokens=max_tokens,
                                        api_key=os.environ.get("OPENAI_API_KEY", "")))
    raise ValueError(f"unknown assistant {spec!r}: local, local:MODEL, openai:URL:MODEL or scripted")


# ---- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m usersim_ui.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intents", default="sample", help="'sample' or a .jsonl (intent, id) / .txt (one per line) file")
    p.add_argument("--max-intents", type=int, default=None, help="only the first N intents")
    p.add_argument("--samples", type=int, default=3, help="dialogues per intent and arm")
    p.add_argument("--assistant", default="local", help="local | local:MODEL | openai:URL:MODEL")
    p.add_argument("--assistant-b", default=None, help="B arm's assistant (makes it an A/B run)")
    p.add_argument("--guardrails", default=None, help="A arm's guardrails: off | name=value,... (default: the paper's)")
    p.add_argument("--guardrails-b", default=None, help="B arm's guardrails, e.g. off or first_token=0,length=0")
    p.add_argument("--out", required=True, help="runs/NAME.jsonl; NAME.csv, NAME.dialogues.csv, NAME.html beside it")
    p.add_argument("--concurrency", type=int, default=1, help="dialogues in flight (in-process: their user turns "
                                                                  "are batched together)")
    p.add_argument("--user-server", default=None, help="comma-separated completions base URLs (…/v1) running the user model")
    p.add_argument("--user-server-model", default=None, help="model name on the user servers (default: their first)")
    p.add_argument("--user-model", default=None, help="userlm | baseline | a path (default: by device); with "
                                                      "--user-server: whose tokenizer/format the server runs")
    p.add_argument("--max-turns", type=int, default=6, help="user turns before the cap ends a dialogue")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=96, help="per user turn")
    p.add_argument("--assistant-max-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request to a user server")
    p.add_argument("--limit", type=int, default=None, help="stop after N new dialogues (resume later)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the intervals")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .memory import limit_malloc_growth

    limit_malloc_growth()  # many threads, one model on the CPU: keep RSS flat (memory.py says why)
    arm_a = Arm("A", args.assistant, parse_guardrails(args.guardrails))
    arms = [arm_a]
    if args.assistant_b or args.guardrails_b:
        arms.append(Arm("B", args.assistant_b or args.assistant, parse_guardrails(args.guardrails_b, arm_a.guardrails)))
    intents = load_intents(args.intents)[: args.max_intents]
    jobs = plan(intents, args.samples, arms, args.seed)
    by_name = {a.name: a for a in arms}
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
    from .engine import RunSettings

    settings = {a.name: RunSettings(guardrails=a.guardrails, sampling=sampling, max_turns=args.max_turns) for a in arms}
    model_lock = threading.Lock()
    replica_for: Callable[[Job], str | None] = lambda job: None
    if args.user_server:
        from .remote_user import CompletionsUserSimulator, replica_index

        urls = [u.strip() for u in args.user_server.split(",") if u.strip()]
        tok, fmt = user_tokenizer_and_format(args.user_model)
        model = args.user_server_model or served_model(urls[0])
        sims = [CompletionsUserSimulator(u, model, tok, fmt, timeout_s=args.timeout) for u in urls]
        simulator_for = lambda job: sims[replica_index(job.key, len(sims))]  # noqa: E731
        replica_for = lambda job: urls[replica_index(job.key, len(urls))]  # noqa: E731
    else:
        if args.user_model == "tiny":
            local = tiny_simulator()
        else:
            from .defaults import default_simulator

            local = default_simulator(args.user_model)
        # dialogues in flight share the model: their waiting user turns go as one batched call
        shared = TurnBatcher(local, model_lock) if args.concurrency > 1 else Serialised(local, model_lock)
        simulator_for = lambda job: shared  # noqa: E731

    def backend_for(job: Job) -> Any:
        spec = by_name[job.arm].assistant
        backend = make_assistant(spec, job.seed, args.assistant_max_tokens, args.max_turns)
        return Serialised(backend, model_lock) if spec.startswith("local") else backend

    out = Path(args.out)
    print(f"{len(jobs)} dialogues planned ({len(intents)} intents x {args.samples} samples x {len(arms)} arm(s)) -> {out}",
          file=sys.stderr)
    result = run_batch(jobs, simulator_for, backend_for, lambda job: settings[job.arm], out,
                       concurrency=args.concurrency, limit=args.limit, replica_for=replica_for,
                       show_bar=not args.no_progress)
    print(f"wrote {result.written}, skipped {result.skipped} already done, {result.failed} failed, "
          f"{result.elapsed_s:.1f} s", file=sys.stderr)
    calls = getattr(simulator_for(jobs[0]), "calls", None) if jobs else None
    if isinstance(calls, list) and calls:
        print(f"user turns batched: {sum(calls)} turns in {len(calls)} model calls", file=sys.stderr)
    if read_records(out):
        report = write_reports(out, n_boot=args.bootstrap, seed=args.seed)
        for kind, path in report["paths"].items():
            if path.exists():
                print(f"{kind}: {path}")
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
