"""The batch report a researcher would publish: an A/B from the CLI with --repeats 2 gives one
self-contained HTML file with every transcript, A and B turn by turn per intent and seed, and the
noise floor beside every difference; repeats keep today's seeds and keys at K=1; the report
renders no markup from dialogue text."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
from test_batch import run_cli

from usersim_ui.analysis import distribution as dist
from usersim_ui.batch.runner import Arm, plan, read_records, write_reports
from usersim_ui.core.dialogue import Dialogue, GuardrailSettings, Turn, dialogue_to_dict
from usersim_ui.core.intents import SampleIntent
from usersim_ui.core.seeds import sample_seed

TINY = ["--user-model", "tiny", "--assistant", "scripted", "--max-new-tokens", "6", "--bootstrap", "50"]


@pytest.fixture(scope="module")
def ab_repeats(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ab") / "ab.jsonl"
    run_cli("--intents", "sample", "--max-intents", "2", "--samples", "1", "--max-turns", "2", "--guardrails-b", "off",
            "--repeats", "2", "--concurrency", "8", "--out", str(out), *TINY, timeout=300)
    return out


def test_an_ab_batch_with_two_repeats_reports_transcripts_pairs_and_the_noise_floor(ab_repeats: Path):
    records = read_records(ab_repeats)
    assert len(records) == 8  # 2 intents x 1 sample x 2 arms x 2 repeats
    for r in records:
        b = r["batch"]
        assert b["seed"] == sample_seed(0, b["intent_id"], b["sample"], b["repeat"])
        assert b["key"] == f"{b['intent_id']}/{b['sample']}/{b['arm']}" + (f"/r{b['repeat']}" if b["repeat"] else "")
    seeds = {(r["batch"]["intent_id"], r["batch"]["repeat"]): set() for r in records}
    for r in records:
        seeds[(r["batch"]["intent_id"], r["batch"]["repeat"])].add(r["batch"]["seed"])
    assert all(len(s) == 1 for s in seeds.values())  # both arms of a repeat share the seed
    assert len({next(iter(s)) for s in seeds.values()}) == 4  # each repeat its own fresh seed

    page = ab_repeats.with_suffix(".html").read_bytes().decode("utf-8")  # as written: \r kept
    assert "<script src=" not in page and page.count("plotly.js (basic") == 1 and len(page) < 1_500_000
    # every transcript, collapsible, with an anchor the intent rows link to
    ids = re.findall(r"<details class='dialogue' id='(t-[^']+)'>", page)
    assert len(ids) == 8 and len(set(ids)) == 8
    assert all(f"href='#{i}'" in page for i in ids)
    for r in records:  # every turn's text is in the report, escaped
        for m in r["messages"]:
            assert dist.html.escape(m["content"], quote=True) in page
    assert "id='filter'" in page and "textContent.toLowerCase()" in page  # the search box
    # the paired view: one per (intent, sample, repeat), turn i of A beside turn i of B
    pairs = re.findall(r"<details class='pair dialogue' id='(p-[^']+)'>", page)
    assert len(pairs) == 4 and all(f"href='#{p}'" in page for p in pairs)
    first = page.split("<details class='pair dialogue'")[1].split("</details>")[0]
    assert first.count("<tr><td><div class='turn user'>") >= 1 and "<th>A</th><th>B</th>" in first
    # the noise floor beside every difference, and the verdict
    assert "Noise floor (range across repeats)" in page and "unknown: one repeat" not in page
    assert page.count("inside the noise</span>") + page.count("larger than the noise</span>") >= 10
    # readable names in the report, ids in the CSV headers
    assert "Mean P(end)" in page and "User turns per dialogue" in page and ">mean_user_turns<" not in page
    rows = {row["metric"]: row for row in csv.DictReader(open(ab_repeats.with_suffix(".csv"), encoding="utf-8"))}
    assert {"A_repeat_sd", "A_repeat_range", "B_repeat_range", "diff_repeat_sd", "noise_floor", "inside_noise"} <= set(
        rows["mean_p_end"])
    # the noise floor recounted: each arm's metric per repeat, from the records
    for metric in ("mean_user_turns", "mean_p_end"):
        spread = []
        for arm in "AB":
            per = [dist.metric_values([d for d in _dialogues(records, arm, k)])[metric] for k in (0, 1)]
            spread.append(abs(per[1] - per[0]))
        assert float(rows[metric]["noise_floor"]) == pytest.approx(max(spread))
        assert rows[metric]["inside_noise"] == str(abs(float(rows[metric]["diff"])) <= max(spread))
    assert "Small sample" in page and f"fewer than {dist.MIN_INTENTS_FOR_INTERVALS}" in page  # 2 intents
    per = list(csv.DictReader(open(ab_repeats.with_name("ab.dialogues.csv"), encoding="utf-8")))
    assert sorted(row["repeat"] for row in per) == ["0"] * 4 + ["1"] * 4


def _dialogues(records: list[dict], arm: str, repeat: int) -> list[Dialogue]:
    from usersim_ui.core.dialogue import dialogue_from_dict

    return [dialogue_from_dict(r) for r in records if r["batch"]["arm"] == arm and r["batch"]["repeat"] == repeat]


def test_one_repeat_keeps_the_seeds_and_keys_of_files_written_before_repeats():
    intents = [SampleIntent("trip", "t", "c", "You want a trip."), SampleIntent("code", "c", "c", "You want code.")]
    arms = [Arm("A"), Arm("B", guardrails=GuardrailSettings(first_token_filter=False))]
    jobs = plan(intents, 2, arms, base_seed=7)
    assert jobs == plan(intents, 2, arms, base_seed=7, repeats=1)
    for job in jobs:  # the formula of every batch written so far, restated
        digest = hashlib.sha256(f"7\0{job.intent_id}\0{job.sample}".encode()).digest()
        assert job.seed == int.from_bytes(digest[:4], "big") % 2**31
        assert job.key == f"{job.intent_id}/{job.sample}/{job.arm}" and job.repeat == 0
    more = plan(intents, 2, arms, base_seed=7, repeats=3)
    assert more[: len(jobs)] == jobs and len(more) == 3 * len(jobs)
    assert len({j.key for j in more}) == len(more)
    assert len({(j.intent_id, j.sample, j.seed) for j in more}) == 3 * 2 * 2  # fresh seeds, shared by the arms
    with pytest.raises(ValueError):
        plan(intents, 1, arms, repeats=0)


HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\"' & </details></pre>"


def test_the_report_renders_no_markup_from_dialogue_text(tmp_path: Path):
    records = []
    for repeat in (0, 1):
        for arm in "AB":
            d = Dialogue(intent=HOSTILE, turns=(Turn("user", HOSTILE, words=3, p_end=3e-5), Turn("assistant", HOSTILE)),
                         ended_by="turn_cap", user_model=HOSTILE, assistant_model=HOSTILE, id=f"x{arm}{repeat}")
            key = f"i<b>/0/{arm}" + (f"/r{repeat}" if repeat else "")
            records.append({**dialogue_to_dict(d), "batch": {"key": key, "intent_id": "i<b>", "sample": 0, "arm": arm,
                                                              "repeat": repeat, "seed": 1, "max_turns": HOSTILE,
                                                              "guardrails": {"x": HOSTILE}}})
    out = tmp_path / "hostile.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_reports(out, n_boot=20)
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    body = page.split("<h2>Intents</h2>")[1]  # after the figures: the intents, pairs and transcripts
    head = page.split("<h2>Figures</h2>")[0]  # the title, notes, settings and metrics
    for part in (head, body):
        assert "<script>alert" not in part and "<img" not in part and "i<b>" not in part
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in part
    assert body.count("</details>") == body.count("<details") and "i&lt;b&gt;" in body  # nothing closed early
    assert "3.00e-05" in page  # P(end) in scientific notation, never 0.0000


def test_noise_floor_on_known_values():
    def run(turns: int, p: float) -> Dialogue:
        return Dialogue("plan a trip", tuple(t for _ in range(turns) for t in (Turn("user", "hi there", p_end=p),
                                                                                 Turn("assistant", "ok"))),
                        ended_by="turn_cap")
    by_repeat = {0: {"A": [run(2, 0.1)], "B": [run(3, 0.1)]}, 1: {"A": [run(4, 0.1)], "B": [run(3, 0.1)]}}
    noise = dist.noise_table(by_repeat).set_index("metric")
    assert noise.loc["mean_user_turns", "A_repeat_range"] == 2 and noise.loc["mean_user_turns", "B_repeat_range"] == 0
    assert noise.loc["mean_user_turns", "noise_floor"] == 2
    assert noise.loc["mean_user_turns", "A_repeat_sd"] == pytest.approx(2 ** 0.5)
    assert noise.loc["mean_user_turns", "diff_repeat_range"] == 2  # B - A: +1 then -1
    table = dist.with_noise(dist.metrics_table({"A": [run(2, 0.1), run(4, 0.1)], "B": [run(3, 0.1), run(3, 0.1)]},
                                               n_boot=20), dist.noise_table(by_repeat)).set_index("metric")
    assert table.loc["mean_user_turns", "inside_noise"] is True  # 0 difference, 2 of noise
    assert dist.format_value("mean_p_end", 3e-5) == "3.00e-05" and dist.format_value("mean_user_turns", 2.0) == "2"
