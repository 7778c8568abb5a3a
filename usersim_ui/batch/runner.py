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
``generate()`` call (``users.batcher``), and the assistant's turns take it one at a time; a simulated
user on completions servers runs ``--concurrency`` dialogues in flight, each pinned to one
replica for all its turns (sha256 of its key modulo the number of servers), which keeps the
server's prefix cache warm.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailSettings,
    dialogue_from_dict,
    dialogue_to_dict,
)
from usersim_ui.core.intents import SampleIntent, load_sample_intents
from usersim_ui.core.limits import MAX_INTENT_CHARS, check_text
from usersim_ui.core.seeds import sample_seed

# ---- plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """One side of a run: which assistant answers and which guardrails the user runs with."""

    name: str
    assistant: str = "local"  # a spec string (assistants.registry.SPEC_FORMS)
    guardrails: GuardrailSettings = field(default_factory=GuardrailSettings)


@dataclass(frozen=True)
class Job:
    key: str
    intent_id: str
    intent: str
    sample: int
    arm: str
    seed: int
    repeat: int = 0


def job_key(intent_id: str, sample: int, arm: str, repeat: int = 0) -> str:
    """``intent/sample/arm``, and ``intent/sample/arm/rN`` for repeat N > 0 (repeat 0 keeps the old key)."""
    return f"{intent_id}/{sample}/{arm}" + (f"/r{repeat}" if repeat else "")


def plan(intents: Sequence[SampleIntent], samples: int, arms: Sequence[Arm], base_seed: int = 0,
         repeats: int = 1) -> list[Job]:
    """Every (repeat, intent, sample, arm), arms interleaved so that a partial run holds matched
    pairs, and repeats outermost so that a partial run holds whole repeats first.

    ``repeats`` K > 1 reruns the whole grid with fresh seeds (:func:`sample_seed`): the spread of a
    metric across repeats is the noise floor an A-B difference is read against."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    return [Job(job_key(i.id, s, a.name, r), i.id, i.intent, s, a.name, sample_seed(base_seed, i.id, s, r), r)
            for r in range(repeats) for i in intents for s in range(samples) for a in arms]


INTENT_SUFFIXES = (".jsonl", ".txt")
_INTENT_ID = re.compile(r"\w[\w .:+-]{0,99}")  # in keys (id/sample/arm), file names and reports
INTENTS_SHAPE = ('a .jsonl intents file holds one JSON object a line, like {"intent": "You want ...", "id": "trip"} '
                 "(a .txt file: one intent a line)")


@dataclass(frozen=True)
class IntentFile:
    """The intents a file holds that can run, and why each other line cannot ("line 3: ...")."""

    intents: list[SampleIntent]
    problems: list[str]


def _intent_from_line(line: str, lineno: int, jsonl: bool) -> SampleIntent:
    """One line as an intent, or a ValueError saying what is wrong with it (never echoing it)."""
    if not jsonl:
        data: Any = {"intent": line}
    else:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
        data = {"intent": data} if isinstance(data, str) else data
        if not isinstance(data, dict):
            raise ValueError("not an object")
    intent = data.get("intent")
    if not isinstance(intent, str):
        raise ValueError("no 'intent' text")
    intent = intent.strip()
    if not intent:
        raise ValueError("the intent is empty")
    check_text(intent, "the intent", MAX_INTENT_CHARS)
    raw_id = data.get("id")
    if raw_id is None or raw_id == "":
        raw_id = f"line{lineno}"
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ValueError("'id' must be text or a whole number")
    iid = str(raw_id).strip()
    if not _INTENT_ID.fullmatch(iid):
        raise ValueError("'id' may hold letters, digits, spaces and . _ : + - (at most 100 characters, "
                         "starting with a letter or digit)")
    title, category = data.get("title"), data.get("category")
    return SampleIntent(id=iid, title=title if isinstance(title, str) else (iid if jsonl else f"line {lineno}"),
                        category=category if isinstance(category, str) else "", intent=intent)


def read_intents(source: str) -> IntentFile:
    """``sample`` (the app's sample intents), a JSONL file (``intent`` and optional ``id``), or a
    text file with one intent per line, every intent checked up front: text within the intent
    limit and a usable id, unique. A bad line is listed and skipped, so that it can neither stop
    the batch at its dialogue (on every rerun) nor hide the others. A file that cannot be read as
    a whole raises ValueError (or OSError); no message repeats the file's path or its text, since
    the Batch tab shows them to whoever uploaded it."""
    if source == "sample":
        return IntentFile(load_sample_intents(), [])
    path = Path(source)
    if path.suffix.lower() not in INTENT_SUFFIXES:
        raise ValueError(f"an intents file ends in .jsonl or .txt; {INTENTS_SHAPE}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the intents file is not UTF-8 text") from None
    jsonl = path.suffix.lower() == ".jsonl"
    intents: list[SampleIntent] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    # lines end at "\n" only: str.splitlines() would also split inside a JSON string at U+2028
    for lineno, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            item = _intent_from_line(line, lineno, jsonl)
        except ValueError as exc:
            problems.append(f"line {lineno}: {exc}")
            continue
        if item.id in first_line:
            problems.append(f"line {lineno}: its id is already used on line {first_line[item.id]}")
            continue
        first_line[item.id] = lineno
        intents.append(item)
    return IntentFile(intents, problems)


def load_intents(source: str) -> list[SampleIntent]:
    """The intents of :func:`read_intents` that can run (its problems dropped)."""
    return read_intents(source).intents


# ---- the JSONL file -------------------------------------------------------------------------

def quarantine_path(out: Path) -> Path:
    return out.with_name(out.stem + ".quarantine.jsonl")


def errors_path(out: Path) -> Path:
    return out.with_name(out.stem + ".errors.jsonl")


def _check_record(record: Any) -> str:
    """The record's key, or a ValueError saying why the line is not a finished dialogue."""
    batch = record.get("batch") if isinstance(record, dict) else None
    if not isinstance(batch, dict) or not isinstance(batch.get("key"), str):
        raise ValueError("no batch key")
    if not (isinstance(batch.get("arm"), str) and isinstance(batch.get("intent_id"), str)
            and isinstance(batch.get("sample"), int)):
        raise ValueError("batch record without arm, intent_id and sample")
    dialogue_from_dict(record)  # raises a RecordError naming the field
    return batch["key"]


def _scan(path: Path) -> tuple[list[tuple[bytes, dict[str, Any]]], list[tuple[int, str, str]]]:
    """The file's finished records (raw line, parsed), one per key, and its other lines
    (line number, text, why)."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is a line cut short (or empty)
    good: list[tuple[bytes, dict[str, Any]]] = []
    bad: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            key = _check_record(record)
        except UnicodeDecodeError:
            bad.append((lineno, line.decode("utf-8", "replace"), "not UTF-8"))
            continue
        except ValueError as exc:  # JSONDecodeError and RecordError are ValueErrors
            reason = f"not a JSON line ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else f"not a record ({exc})"
            bad.append((lineno, line.decode("utf-8", "replace"), reason))
            continue
        if key in seen:
            bad.append((lineno, line.decode("utf-8", "replace"), f"a second record of {key} (line {seen[key]} kept)"))
            continue
        seen[key] = lineno
        good.append((line, record))
    if lines[-1].strip():
        bad.append((len(lines), lines[-1].decode("utf-8", "replace"), "cut short (no line end): the run was stopped while writing it"))
    return good, bad


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _quarantine(source: Path, out: Path, bad: Sequence[tuple[int, str, str]]) -> None:
    """Append lines taken out of ``source`` to ``out``'s quarantine file, with where and why."""
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(quarantine_path(out), "a", encoding="utf-8") as fh:
        for lineno, text, reason in bad:
            fh.write(json.dumps({"file": source.name, "line": lineno, "reason": reason, "at": now, "text": text},
                                ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The finished records of a batch file, one per key, in file order.

    A line that is not one (cut short by a kill, torn, not JSON, not a dialogue, a second record
    of a key written by a second writer) is skipped, never fatal; with ``repair`` (a run, holding
    the file's lock) it is moved to ``NAME.quarantine.jsonl`` with its line number and the reason,
    and the file is rewritten without it, atomically, so the next run starts clean and nothing is lost.
    """
    if not path.exists():
        return []
    good, bad = _scan(path)
    if bad and repair:
        _quarantine(path, path, bad)
        _write_atomically(path, b"".join(line + b"\n" for line, _ in good))
    return [record for _, record in good]


def _prune_errors(out: Path, succeeded: set[str]) -> None:
    """Keep ``NAME.errors.jsonl`` to the dialogues that failed and have not finished since: an
    entry whose key is now in the output goes, and of several failures of one key the last stays.
    (Lines that are not JSON go to the quarantine file.)"""
    path = errors_path(out)
    if not path.exists():
        return
    raw = path.read_bytes()
    latest: dict[str, bytes] = {}
    bad: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            batch = json.loads(line.decode("utf-8")).get("batch", {})
            key = batch["key"]
        except (ValueError, AttributeError, KeyError, TypeError):
            bad.append((lineno, line.decode("utf-8", "replace"), "not an error record"))
            continue
        latest.pop(key, None)  # re-inserted: file order follows the last failure
        latest[key] = line
    kept = b"".join(line + b"\n" for key, line in latest.items() if key not in succeeded)
    if bad:
        _quarantine(path, out, bad)
    if kept != raw:
        if kept:
            _write_atomically(path, kept)
        else:
            path.unlink()


# ---- one writer per output ------------------------------------------------------------------

class BatchLocked(RuntimeError):
    """Another run is writing this output; a second writer would write every dialogue twice."""


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def _holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def output_lock(out: Path) -> Iterator[dict[str, Any] | None]:
    """Hold ``NAME.jsonl.lock`` beside the output for as long as the block runs.

    The lock is an ``flock`` on that file, which the kernel drops when its holder dies however it
    dies, so a lock left by a killed run is simply taken over (the block receives what the dead
    holder wrote: pid, host, start time); a live holder makes this raise :class:`BatchLocked`
    naming its pid and start time. The file names its holder for people and is removed on release.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BatchLocked(
                f"{out} is being written by another batch run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}). Two writers would write every "
                "dialogue twice: wait for it to finish, or stop it and run again (a stopped run's lock is taken over)."
            ) from None
        try:  # the holder we waited for may have removed the file: then lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stale = _holder(fd) or None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
          "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
    try:
        yield stale
    finally:
        try:
            os.unlink(path)  # before unlocking: whoever opened it meanwhile sees the inode change
        except FileNotFoundError:
            pass
        os.close(fd)


def record_key(record: dict[str, Any]) -> str | None:
    batch = record.get("batch")
    return batch.get("key") if isinstance(batch, dict) else None


def arms_from_records(records: Sequence[dict[str, Any]]) -> dict[str, list[Dialogue]]:
    """Dialogues per arm, in the order the arms first appear (A before B)."""
    arms: dict[str, list[Dialogue]] = {}
    for record in sorted(records, key=lambda r: (r["batch"]["arm"], r["batch"]["intent_id"], r["batch"]["sample"],
                                                 repeat_of(r))):
        arms.setdefault(record["batch"]["arm"], []).append(dialogue_from_dict(record))
    return arms


# ---- running --------------------------------------------------------------------------------

class Serialised:
    """Calls into one in-process model, one at a time under ``lock``: threads would only fight
    over the same cores. (The app's batch tab does not use this: its turns take the model slot
    in ``app.handlers.turn_maker``.)"""

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
              turn_maker_for: Callable[[Job], Callable[[Dialogue, Any], Dialogue]] | None = None,
              lock: bool = True, on_turn: Callable[[Job, Dialogue], None] | None = None) -> BatchResult:
    """Run every job whose key is not yet in ``out``; append one line per finished dialogue.

    ``limit`` stops after that many new lines (dialogues still running are abandoned, not
    written). ``progress(done, total, key)`` is called after each line; ``on_turn(job, dialogue)``
    after each turn of each dialogue (the Batch tab's turn-level progress). ``turn_maker_for(job)``,
    when given, makes each turn instead of the job's simulator and backend (the app routes
    model turns through its ``@spaces.GPU`` function, so that a batch runs on ZeroGPU too).

    The run holds ``out``'s lock (:func:`output_lock`; a caller that holds it already passes
    ``lock=False``), so a second run on the same file is refused instead of writing every
    dialogue again. Lines of ``out`` that are not finished records go to the quarantine file
    (:func:`read_records`); a job that fails, its intent included, is written to
    ``NAME.errors.jsonl`` and the batch goes on; an error entry goes once its dialogue finishes.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out) if lock else nullcontext():
        return _run_batch(jobs, simulator_for, backend_for, settings_for, out, concurrency, limit, progress,
                          stop_event, replica_for, show_bar, turn_maker_for, on_turn)


def _run_batch(jobs: Sequence[Job], simulator_for: Callable[[Job], Any], backend_for: Callable[[Job], Any],
               settings_for: Callable[[Job], Any], out: Path, concurrency: int, limit: int | None,
               progress: Callable[[int, int, str], None] | None, stop_event: threading.Event | None,
               replica_for: Callable[[Job], str | None], show_bar: bool,
               turn_maker_for: Callable[[Job], Callable[[Dialogue, Any], Dialogue]] | None,
               on_turn: Callable[[Job, Dialogue], None] | None = None) -> BatchResult:
    from usersim_ui.core.transitions import auto_run, new_dialogue, run

    done = {record_key(r) for r in read_records(out, repair=True)}
    _prune_errors(out, done)  # entries of earlier runs whose dialogue has finished since
    pending = [j for j in jobs if j.key not in done]
    skipped = len(jobs) - len(pending)
    stop = stop_event or threading.Event()
    write_lock = threading.Lock()
    failures = errors_path(out)
    state = {"written": 0, "failed": 0}
    finished: set[str] = set()
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
        dialogue = Dialogue(intent=job.intent, id=re.sub(r"[^A-Za-z0-9_.-]+", "-", job.key))
        t0 = time.perf_counter()
        meta = {"key": job.key, "intent_id": job.intent_id, "sample": job.sample, "arm": job.arm, "seed": job.seed,
                "repeat": job.repeat, "replica": replica_for(job), "max_turns": settings.max_turns,
                "guardrails": asdict(settings.guardrails), "sampling": asdict(settings.sampling)}
        try:
            # inside the try: an intent the checks missed fails its own dialogue, not the batch
            dialogue = replace(new_dialogue(job.intent, simulator, backend), id=dialogue.id)
            turns = (auto_run(dialogue, simulator, backend, settings, stop_event=stop) if turn_maker_for is None
                     else run(dialogue, turn_maker_for(job), lambda: settings))
            for dialogue in turns:
                if on_turn is not None:
                    on_turn(job, dialogue)
        except Exception as exc:  # noqa: BLE001 - one failed dialogue must not end the batch
            if stop.is_set():  # stopped (the cancellation, or what it broke): not written, redone on a rerun
                return
            with write_lock:
                state["failed"] += 1
                with open(failures, "a", encoding="utf-8") as fh:
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
            finished.add(job.key)
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
        _prune_errors(out, done | finished)
    return BatchResult(out, state["written"], skipped, state["failed"], stop.is_set(), time.perf_counter() - started)


# ---- outputs --------------------------------------------------------------------------------

def output_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return {"jsonl": out, "csv": Path(f"{stem}.csv"), "dialogues_csv": Path(f"{stem}.dialogues.csv"),
            "html": Path(f"{stem}.html"), "errors": errors_path(out), "quarantine": quarantine_path(out)}


def repeat_of(record: dict[str, Any]) -> int:
    """A record's repeat (files written before ``--repeats`` existed hold repeat 0 only)."""
    value = record["batch"].get("repeat", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def arm_settings(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """What each arm ran with, as the report's settings table shows it (the first record of the
    arm speaks for it: a batch gives all of an arm's dialogues the same settings)."""
    out: dict[str, dict[str, str]] = {}
    for record in sorted(records, key=lambda r: r["batch"]["arm"]):
        arm = record["batch"]["arm"]
        if arm in out:
            continue
        meta = record["batch"]
        mine = [r for r in records if r["batch"]["arm"] == arm]
        rows = {"user model": str(record.get("user_model")), "assistant model": str(record.get("assistant_model")),
                "dialogues": str(len(mine)), "intents": str(len({r["batch"]["intent_id"] for r in mine})),
                "samples per intent": str(len({r["batch"]["sample"] for r in mine})),
                "repeats": str(len({repeat_of(r) for r in mine})), "max user turns": str(meta.get("max_turns"))}
        sampling = meta.get("sampling") if isinstance(meta.get("sampling"), dict) else {}
        for name in ("temperature", "top_p", "max_new_tokens"):
            if name in sampling:
                rows[f"sampling: {name}"] = str(sampling[name])
        guardrails = meta.get("guardrails") if isinstance(meta.get("guardrails"), dict) else {}
        for name, value in guardrails.items():
            rows[f"guardrail: {name}"] = str(value)
        out[arm] = rows
    return out


def write_reports(out: Path, title: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics CSV, per-dialogue CSV and the HTML report, all from the JSONL alone.

    With more than one repeat (``--repeats``), the metrics CSV gains each metric's spread across
    repeats (``A_repeat_sd``, ``A_repeat_range``, ..., ``noise_floor``, ``inside_noise``) and the
    per-dialogue CSV a ``repeat`` column; a one-repeat run's CSVs are as they always were."""
    from usersim_ui.analysis import distribution as dist

    records = read_records(out)
    arms = arms_from_records(records)
    table = dist.metrics_table(arms, n_boot=n_boot, seed=seed)
    repeats = sorted({repeat_of(r) for r in records})
    if len(repeats) > 1:
        by_repeat = {k: arms_from_records([r for r in records if repeat_of(r) == k]) for k in repeats}
        table = dist.with_noise(table, dist.noise_table(by_repeat))
    figs = dist.figures(arms, table)
    paths = output_paths(out)
    dist.write_csv(table, paths["csv"])
    per = dist.dialogue_table(arms)
    keys = {r["batch"]["key"]: r for r in records}
    ids = {dialogue_from_dict(r).id: r["batch"]["key"] for r in records}
    per.insert(0, "key", per["id"].map(ids))
    per.insert(1, "intent_id", per["key"].map(lambda k: keys[k]["batch"]["intent_id"]))
    per.insert(2, "sample", per["key"].map(lambda k: keys[k]["batch"]["sample"]))
    if len(repeats) > 1:
        per.insert(3, "repeat", per["key"].map(lambda k: repeat_of(keys[k])))
    dist.write_csv(per, paths["dialogues_csv"])
    notes = [f"{len(records)} dialogues from {out.name}; arms: " + ", ".join(f"{a} ({len(d)})" for a, d in arms.items())]
    notes.append(f"Intervals: bootstrap over intents, {n_boot} draws, numpy seed {seed}.")
    if len(repeats) > 1:
        notes.append(f"{len(repeats)} repeats of every (intent, sample) with fresh seeds: the noise floor beside each "
                     "difference is the largest range of an arm's metric across them.")
    ordered = sorted(records, key=lambda r: (r["batch"]["intent_id"], repeat_of(r), r["batch"]["sample"], r["batch"]["arm"]))
    entries = [dist.Entry(r["batch"]["key"], r["batch"]["arm"], r["batch"]["intent_id"], r["batch"]["sample"],
                          repeat_of(r), r["batch"].get("seed"), dialogue_from_dict(r)) for r in ordered]
    paths["html"].write_text(dist.report_html(title or f"UserSim batch: {out.stem}", table, figs, notes,
                                              settings=arm_settings(records), entries=entries, repeats=len(repeats)),
                             encoding="utf-8")
    return {"paths": paths, "table": table, "figures": figs, "arms": arms, "dialogues": per}


# ---- models ---------------------------------------------------------------------------------
