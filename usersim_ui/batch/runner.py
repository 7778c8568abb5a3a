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

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailSettings,
    dialogue_from_dict,
    dialogue_to_dict,
)
from usersim_ui.core.intents import SampleIntent, load_sample_intents

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
    from usersim_ui.core.transitions import auto_run, new_dialogue, run

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
    from usersim_ui.analysis import distribution as dist

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
