"""Batch runs from the command line, resuming, A/B seeds, and every reported number recounted
from the JSONL by code that shares nothing with usersim_ui.analysis.distribution."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from usersim_ui.analysis import distribution as dist
from usersim_ui.batch.runner import (
    read_records,
    write_reports,
)
from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailEvent,
    GuardrailSettings,
    RejectedSample,
    Turn,
)
from usersim_ui.core.guardrails import parse_guardrails
from usersim_ui.core.seeds import sample_seed

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "usersim_ui.batch", *args, "--no-progress"], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---- 12 intents x 3 samples from the CLI ----------------------------------------------------
# The real offline defaults (SmolLM2 as prompted-baseline user and as assistant) run a smaller
# grid here; the full 12 x 3 with them takes tens of minutes on two cores, so its output is
# committed (docs/batch-offline-12x3/) and recounted. The full grid also runs here with the tiny
# UserLM-shaped user (real Llama-3 tokenizer, random weights) and the scripted assistant; all go
# through the same CLI, JSONL, CSV and HTML.

@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "real.jsonl"
    run_cli("--intents", "sample", "--max-intents", "3", "--samples", "2", "--assistant", "local", "--max-turns", "2",
            "--max-new-tokens", "8", "--assistant-max-tokens", "8", "--out", str(out), "--bootstrap", "200",
            env={"USERSIM_USER_MODEL": "baseline"})
    return out


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid") / "grid.jsonl"
    run_cli("--intents", "sample", "--max-intents", "12", "--samples", "3", "--max-turns", "2", "--out", str(out),
            "--user-model", "tiny", "--assistant", "scripted", "--max-new-tokens", "8", "--bootstrap", "200")
    return out


RECORDED = ROOT / "docs" / "batch-offline-12x3" / "offline-12x3.jsonl"


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory) -> Path:
    """The full 12 x 3 grid on the real offline defaults, as the CLI wrote it (command and timing
    in docs/benchmarks.md; too slow to rerun in CI), copied so that its report can be rebuilt."""
    out = tmp_path_factory.mktemp("recorded") / RECORDED.name
    for src in RECORDED.parent.iterdir():
        shutil.copy(src, out.parent / src.name)
    return out


def check_outputs(out: Path, n: int) -> list[dict]:
    records = [json.loads(line) for line in lines(out)]
    assert len(records) == n
    keys = [r["batch"]["key"] for r in records]
    assert len(set(keys)) == n
    assert all(r["ended_by"] in ("user", "turn_cap") for r in records)
    html = out.with_suffix(".html").read_text(encoding="utf-8")
    # self-contained: plotly.js inline once (the partial bundle), no script fetched from anywhere
    assert "<script src=" not in html and "Plotly.newPlot" in html and html.count("plotly.js (basic") == 1
    assert len(html) < 2_000_000 + 20_000 * n  # was 4.7 MB for 36 dialogues with plotly.js in full
    assert html.count("<details class='dialogue'") == n  # every transcript
    assert out.with_suffix(".csv").exists() and out.with_name(out.stem + ".dialogues.csv").exists()
    return records


def test_offline_defaults_batch_writes_jsonl_csv_and_html(real_run: Path):
    records = check_outputs(real_run, 6)
    assert all("prompted user baseline" in r["user_model"] and "SmolLM2" in r["assistant_model"] for r in records)
    assert all(t["p_end"] is not None for r in records for m, t in zip(r["messages"], r["turns"]) if m["role"] == "user")


def test_the_recorded_twelve_by_three_run_on_the_offline_defaults(recorded_run: Path):
    before = {p.name: p.read_text() for p in recorded_run.parent.glob("*.csv")}
    write_reports(recorded_run, n_boot=200, seed=0)  # the CLI's own report step, HTML included
    assert {p.name: p.read_text() for p in recorded_run.parent.glob("*.csv")} == before  # as committed
    records = check_outputs(recorded_run, 36)
    assert {r["batch"]["sample"] for r in records} == {0, 1, 2} and len({r["batch"]["intent_id"] for r in records}) == 12
    assert all("prompted user baseline" in r["user_model"] and "SmolLM2" in r["assistant_model"] for r in records)
    assert all(t["p_end"] is not None for r in records for m, t in zip(r["messages"], r["turns"]) if m["role"] == "user")


def test_twelve_intents_by_three_samples(grid_run: Path):
    records = check_outputs(grid_run, 36)
    assert {r["batch"]["sample"] for r in records} == {0, 1, 2} and len({r["batch"]["intent_id"] for r in records}) == 12


def recount(records: list[dict]) -> dict[str, float]:
    """Every metric from the raw JSON records, written from the definitions, not from the library."""
    by_intent: dict[str, list[dict]] = {}
    for r in records:
        by_intent.setdefault(r["intent"], []).append(r)

    def user(r):
        return [(m, t) for m, t in zip(r["messages"], r["turns"]) if m["role"] == "user"]

    turns = [(m, t) for r in records for m, t in user(r)]
    p = [t["p_end"] for _, t in turns if t["p_end"] is not None]
    out = {
        "dialogues": len(records),
        "mean_user_turns": sum(len(user(r)) for r in records) / len(records),
        "ended_by_user": sum(r["ended_by"] == "user" for r in records) / len(records),
        "ended_by_turn_cap": sum(r["ended_by"] == "turn_cap" for r in records) / len(records),
        "mean_p_end": sum(p) / len(p),
        "resamples_per_user_turn": sum(len(t["rejected"]) for _, t in turns) / len(turns),
    }
    names = ["first_token", "no_early_ending", "length", "repetition", "retry_cap"]
    for g in names:
        out[f"{g}_activation"] = sum(any(e["guardrail"] == g for e in t["guardrails"]) for _, t in turns) / len(turns)
    out["guardrail_activation"] = sum(any(e["guardrail"] in names for e in t["guardrails"]) for _, t in turns) / len(turns)
    repeats = kept = 0
    for r in records:
        seen: list[str] = []
        for m, t in user(r):
            norm = " ".join(m["content"].lower().split())
            if not t["ends_dialogue"]:
                kept += 1
                repeats += bool(norm) and (norm in seen or " ".join(r["intent"].lower().split()) in norm)
            seen.append(norm)
    out["verbatim_repeat_rate"] = repeats / kept if kept else math.nan
    per: dict[str, list[float]] = {k: [] for k in ("distinct_1", "distinct_2", "distinct_3", "length_variance",
                                                   "length_range", "unigram_difference")}
    for group in by_intent.values():
        firsts = [user(r)[0][0]["content"].lower().split() for r in group if user(r)]
        for n in (1, 2, 3):
            grams = [tuple(w[i:i + n]) for w in firsts for i in range(len(w) - n + 1)]
            if grams:
                per[f"distinct_{n}"].append(100 * len(set(grams)) / len(grams))
        lengths = [len(user(r)) for r in group]
        if len(lengths) > 1:
            mean = sum(lengths) / len(lengths)
            per["length_variance"].append(sum((x - mean) ** 2 for x in lengths) / (len(lengths) - 1))
            per["length_range"].append(max(lengths) - min(lengths))
            vocab = [{w for m, _ in user(r) for w in m["content"].lower().split()} for r in group]
            pairs = [1 - len(a & b) / len(a | b) if a | b else 0.0 for a, b in itertools.combinations(vocab, 2)]
            per["unigram_difference"].append(sum(pairs) / len(pairs))
    out.update({k: sum(v) / len(v) if v else math.nan for k, v in per.items()})
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def close(a: float, b: str) -> bool:
    return (math.isnan(a) and b in ("", "nan")) or math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("which", ["real_run", "grid_run", "recorded_run"])
def test_every_reported_number_is_recounted_from_the_jsonl(which: str, request):
    run = request.getfixturevalue(which)
    records = [json.loads(line) for line in lines(run)]
    expected = recount(records)
    rows = {row["metric"]: row for row in read_csv(run.with_suffix(".csv"))}
    assert set(rows) == set(expected)
    for metric, value in expected.items():
        assert close(value, rows[metric]["A"]), (metric, value, rows[metric]["A"])
        lo, hi = rows[metric]["A_lo"], rows[metric]["A_hi"]
        if metric != "dialogues" and lo not in ("", "nan"):
            assert float(lo) - 1e-9 <= float(hi)
    # the per-dialogue CSV, line by line
    per = {row["key"]: row for row in read_csv(run.with_name(run.stem + ".dialogues.csv"))}
    assert len(per) == len(records)
    for r in records:
        row = per[r["batch"]["key"]]
        users = [t for m, t in zip(r["messages"], r["turns"]) if m["role"] == "user"]
        assert int(row["user_turns"]) == len(users) and row["ended_by"] == r["ended_by"]
        assert int(row["resamples"]) == sum(len(t["rejected"]) for t in users)
        p = [t["p_end"] for t in users if t["p_end"] is not None]
        assert close(sum(p) / len(p), row["mean_p_end"])
    # the intervals are reproducible: the report rebuilt from the JSONL gives the same CSV
    before = run.with_suffix(".csv").read_text()
    write_reports(run, n_boot=200, seed=0)
    assert run.with_suffix(".csv").read_text() == before


# ---- fast runs: tiny UserLM-shaped user, scripted assistant ---------------------------------

TINY = ["--user-model", "tiny", "--assistant", "scripted", "--max-new-tokens", "6", "--bootstrap", "100"]


def test_an_interrupted_batch_resumes_without_redoing_finished_dialogues(tmp_path: Path):
    out = tmp_path / "resume.jsonl"
    common = ["--intents", "sample", "--max-intents", "2", "--samples", "2", "--max-turns", "1", "--out", str(out), *TINY]
    run_cli(*common, "--limit", "3")
    first = lines(out)
    assert len(first) == 3
    with open(out, "a", encoding="utf-8") as fh:  # a kill in the middle of writing a line
        fh.write('{"id": "half a line')
    proc = run_cli(*common)
    after = lines(out)
    assert after[:3] == first  # finished dialogues untouched, not redone
    keys = [json.loads(line)["batch"]["key"] for line in after]
    assert len(keys) == len(set(keys)) == 4
    assert "skipped 3 already done" in proc.stderr
    proc = run_cli(*common)  # nothing left to do
    assert lines(out) == after and "wrote 0, skipped 4" in proc.stderr


def test_ab_arms_share_seeds_and_report_the_difference(tmp_path: Path):
    out = tmp_path / "ab.jsonl"
    run_cli("--intents", "sample", "--max-intents", "3", "--samples", "2", "--max-turns", "2", "--out", str(out),
            "--guardrails-b", "off", "--concurrency", "2", *TINY)
    records = read_records(out)
    assert len(records) == 12
    seeds = {}
    for r in records:
        b = r["batch"]
        seeds.setdefault((b["intent_id"], b["sample"]), set()).add(b["seed"])
        assert b["seed"] == sample_seed(0, b["intent_id"], b["sample"])
        settings = r["turns"][0]["guardrail_settings"]
        assert settings["first_token_filter"] is (b["arm"] == "A")
    assert all(len(s) == 1 for s in seeds.values()) and len(seeds) == 6
    # same seed, same settings for turn 1 of the A arm as an independent in-process run would use
    rows = {row["metric"]: row for row in read_csv(out.with_suffix(".csv"))}
    for metric, row in rows.items():
        assert close(float(row["B"]) - float(row["A"]), row["diff"]) if row["A"] not in ("", "nan") and row["B"] not in ("", "nan") else True
    assert float(rows["first_token_activation"]["B"]) == 0.0  # switched off in B
    by_arm = {arm: [r for r in records if r["batch"]["arm"] == arm] for arm in "AB"}
    for arm, recs in by_arm.items():
        assert close(recount(recs)["mean_p_end"], rows["mean_p_end"][arm])


def test_dialogues_in_flight_share_batched_user_turns(tmp_path: Path):
    out = tmp_path / "flight.jsonl"
    proc = run_cli("--intents", "sample", "--max-intents", "4", "--samples", "2", "--max-turns", "2", "--out", str(out),
                   "--concurrency", "8", *TINY)
    records = read_records(out)
    user_turns = sum(m["role"] == "user" for r in records for m in r["messages"])
    made, calls = map(int, re.search(r"user turns batched: (\d+) turns in (\d+) model calls", proc.stderr).groups())
    assert len(records) == 8 and made == user_turns and calls < user_turns / 2, proc.stderr[-500:]


def test_guardrail_specs():
    assert parse_guardrails("off") == GuardrailSettings(first_token_filter=False, no_early_ending=False,
                                                        length_thresholds=False, verbatim_repetition=False)
    s = parse_guardrails("first_token=0,min_turns=2,retry_cap=3,banned_first_words=Sure|Ok")
    assert (s.first_token_filter, s.min_user_turns_before_end, s.retry_cap, s.banned_first_words) == (False, 2, 3, ("Sure", "Ok"))
    with pytest.raises(ValueError):
        parse_guardrails("nonsense=1")


# ---- distribution functions on hand-made dialogues -----------------------------------------

def u(text: str, p: float = 0.1, ends: bool = False, events=(), rejected=0) -> Turn:
    return Turn(role="user", text=text, words=len(text.split()), p_end=p, ends_dialogue=ends, guardrails=tuple(events),
                rejected=tuple(RejectedSample("x", "length: 1 words") for _ in range(rejected)))


def a(text: str = "ok") -> Turn:
    return Turn(role="assistant", text=text)


def test_distribution_numbers_on_known_dialogues():
    ft = GuardrailEvent("first_token", "masked", "'I' (p=0.5)", probability_removed=0.5)
    d1 = Dialogue("plan a trip", (u("hello there friend", 0.1, events=[ft]), a(), u("", 0.9, ends=True)), ended_by="user")
    d2 = Dialogue("plan a trip", (u("hello again", 0.2, rejected=2), a(), u("hello again", 0.3), a()), ended_by="turn_cap")
    d3 = Dialogue("other task", (u("the other task please", 0.4), a()), ended_by="turn_cap")
    values = dist.metric_values([d1, d2, d3])
    assert values["mean_user_turns"] == pytest.approx(5 / 3)
    assert values["ended_by_user"] == pytest.approx(1 / 3)
    assert values["mean_p_end"] == pytest.approx((0.1 + 0.9 + 0.2 + 0.3 + 0.4) / 5)
    assert values["first_token_activation"] == pytest.approx(1 / 5)
    assert values["resamples_per_user_turn"] == pytest.approx(2 / 5)
    # kept non-ending turns: d1 t1, d2 t1, d2 t2 (repeats t1), d3 t1 (contains the intent)
    assert values["verbatim_repeat_rate"] == pytest.approx(2 / 4)
    # first turns of "plan a trip": "hello there friend", "hello again": 4 distinct of 5 unigrams
    # "other task": "the other task please": 4/4 -> mean (80 + 100) / 2
    assert values["distinct_1"] == pytest.approx((80 + 100) / 2)
    assert values["length_range"] == pytest.approx(0.0) and values["length_variance"] == pytest.approx(0.0)
    # only "plan a trip" has two dialogues: {hello, there, friend} vs {hello, again}: 1 - 1/4
    assert values["unigram_difference"] == pytest.approx(0.75)
    surv = dist.survival_table([d1, d2, d3])
    allrows = surv[surv["group"] == "all"].set_index("turn")["fraction"]
    assert list(allrows) == [1.0, 1.0, pytest.approx(2 / 3)]
    pe = dist.p_end_by_turn([d1, d2, d3])
    assert list(pe["n"]) == [3, 2] and pe["mean"].iloc[0] == pytest.approx(0.7 / 3)
    table = dist.metrics_table({"A": [d1, d2, d3], "B": [d1, d2, d3]}, n_boot=50, seed=1)
    assert (table["diff"].fillna(0) == 0).all()


# ---- the Gradio tab ---------------------------------------------------------------------------

def test_batch_tab_builds_and_its_handler_runs_an_ab_batch(tmp_path: Path, monkeypatch, llama_tok):
    import gradio as gr
    from conftest import userlm_sim
    from loopback_openai import LoopbackOpenAI

    from usersim_ui.app import batch_tab, zerogpu

    with gr.Blocks() as demo:
        with gr.Tab("Batch"):
            batch_tab.build_batch_tab()
    assert any(getattr(dep, "api_name", None) == "batch_run" for dep in demo.fns.values())
    monkeypatch.setattr(zerogpu, "_simulator", userlm_sim(llama_tok))
    made = []  # every user turn of the batch goes through the GPU function, as a Studio turn does
    stream = zerogpu.model_turn_stream
    monkeypatch.setattr(zerogpu, "model_turn_stream", lambda d, *a: made.append(d.next_role) or stream(d, *a))
    monkeypatch.setattr(batch_tab, "output_dir", lambda: tmp_path)
    intents = tmp_path / "two.txt"
    intents.write_text("You want a cheap flight to Lisbon.\nYou want to fix a flaky unit test.\n")
    seen = []
    server = LoopbackOpenAI("trickle", delay_s=0.0, words=6)
    try:
        status, table, *figs, files = batch_tab.run_batch_ui(
            str(intents), 2, 1, "openai", server.url, "loopback", ["first_token", "length"], 6,
            progress=lambda *a, **k: seen.append(k.get("desc")))
    finally:
        server.close()
    assert status.startswith("8 dialogues") and "A (4)" in status and "B (4)" in status
    assert {"metric", "A", "B", "diff", "diff_lo", "diff_hi"} <= set(table.columns)
    assert len(figs) == 4 and all(f.data for f in figs)
    assert {Path(f).suffix for f in files} == {".jsonl", ".csv", ".html"} and seen[-1].startswith("8/8 dialogues")
    # progress by turns, with the current dialogue's turn
    assert any(re.match(r"user turns: \d+ made \(at most 8\) · dialogue \d/8 \(.+\) at user turn 1/1", d or "") for d in seen)
    shown = dict(zip(table["metric"], table["A"]))
    assert "Mean P(end)" in shown and "mean_p_end" not in shown  # names, not ids
    assert re.fullmatch(r"\d\.\d\de[+-]\d\d|0", shown["Mean P(end)"])  # scientific notation, never rounded to 0
    records = [json.loads(line) for line in Path(files[0]).read_text().splitlines()]
    user_turns = sum(m["role"] == "user" for r in records for m in r["messages"])
    assert made == ["user"] * user_turns and user_turns >= 8  # the endpoint's replies take no GPU slice
    assert len(server.requests) == sum(m["role"] == "assistant" for r in records for m in r["messages"])
