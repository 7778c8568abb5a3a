"""The "Batch" tab: many dialogues at once, their distributions and an optional A/B arm.

``build_batch_tab()`` is called by ``ui.py`` inside an open ``gr.Blocks()`` / ``gr.Tab``
context. The handler, :func:`run_batch_ui`, is a plain function (tests call it directly) and
is exposed as the API event ``batch_run``. One batch runs at a time in the app; it is the
session's run in ``run_control``; each of its turns is made as the Studio tab makes one
(``events.turn_maker``): a local-model turn runs in ``gpu.model_turn_stream`` (a ZeroGPU slice on
a Space, where CUDA exists only inside ``@spaces.GPU`` functions) behind the shared model slot,
turn by turn, so interactive sessions keep their place in line and Stop ends the batch within a
token.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from usersim_ui.assistants.registry import BackendSpec
from usersim_ui.batch.runner import (
    Arm,
    Job,
    load_intents,
    plan,
    run_batch,
    write_reports,
)
from usersim_ui.core.dialogue import SamplingSettings
from usersim_ui.core.guardrails import GUARDRAILS, parse_guardrails

GUARDRAIL_CHOICES = [g.name for g in GUARDRAILS]
ASSISTANT_MAX_TOKENS = 128
MAX_DIALOGUES = 400  # a page is not the place for more: use python -m usersim_ui.batch


def output_dir() -> Path:
    """Under the temp dir, which Gradio serves downloads from without allowed_paths."""
    path = Path(tempfile.gettempdir()) / "usersim_batch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_batch_ui(intents_file: Any, samples: float, max_turns: float, assistant: str, base_url: str, model: str,
                 b_off: list[str] | None, max_new_tokens: float = 64, progress: Any = gr.Progress(),
                 request: gr.Request | None = None) -> tuple:
    """Run the batch in-process and return (status, metrics table, 4 figures, files).

    The batch is this session's run (``run_control``): Stop in the Studio tab stops it, it is
    refused while the session has another run, and its model calls take the shared model slot.
    """
    from usersim_ui.app.handlers import RUNS, session_of
    from usersim_ui.app.run_control import RunRefused

    try:
        with RUNS.start(session_of(request)) as run:
            return _run_batch(run, RUNS, intents_file, samples, max_turns, assistant, base_url, model, b_off,
                              max_new_tokens, progress)
    except RunRefused as exc:
        raise gr.Error(str(exc), print_exception=False) from exc


def _run_batch(run: Any, runs: Any, intents_file: Any, samples: float, max_turns: float, assistant: str,
               base_url: str, model: str, b_off: list[str] | None, max_new_tokens: float, progress: Any) -> tuple:
    from usersim_ui.app.handlers import turn_maker
    from usersim_ui.app.zerogpu import simulator
    from usersim_ui.core.transitions import RunSettings

    source = intents_file if isinstance(intents_file, str) else getattr(intents_file, "name", None)
    try:
        intents = load_intents(source or "sample")
    except (OSError, ValueError, KeyError) as exc:
        raise gr.Error(f"Could not read the intents file: {exc}") from exc
    spec = "local" if assistant == "local" else f"openai:{(base_url or '').strip()}:{(model or '').strip()}"
    if assistant != "local" and (not (base_url or "").strip() or not (model or "").strip()):
        raise gr.Error("An OpenAI-compatible assistant needs a base URL and a model name.")
    arms = [Arm("A", spec)]
    if b_off:
        arms.append(Arm("B", spec, parse_guardrails(",".join(f"{g}=0" for g in b_off))))
    jobs = plan(intents, int(samples), arms)
    if len(jobs) > MAX_DIALOGUES:
        raise gr.Error(f"{len(jobs)} dialogues is too many for the page (at most {MAX_DIALOGUES}); "
                       "use python -m usersim_ui.batch for large runs.")
    sampling = SamplingSettings(max_new_tokens=int(max_new_tokens))
    settings = {a.name: RunSettings(guardrails=a.guardrails, sampling=sampling, max_turns=int(max_turns)) for a in arms}
    user = simulator()

    def backend_spec(job: Job) -> BackendSpec:
        if assistant == "local":
            return BackendSpec(kind="local", max_tokens=ASSISTANT_MAX_TOKENS, seed=job.seed)
        return BackendSpec(kind="openai", base_url=(base_url or "").strip(), model=(model or "").strip(),
                           max_tokens=ASSISTANT_MAX_TOKENS, api_key=os.environ.get("OPENAI_API_KEY", ""), seed=job.seed)

    out = output_dir() / f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{threading.get_ident() % 10000}.jsonl"
    progress(0, desc=f"0/{len(jobs)} dialogues")
    # every turn as the Studio tab makes it: local-model turns in the @spaces.GPU function (a ZeroGPU
    # slice on a Space) behind the shared model slot, endpoint turns straight from here
    # no backend object here: turn_maker builds it where the turn runs (a local model only in the GPU function)
    result = run_batch(jobs, lambda job: user, lambda job: None, lambda job: settings[job.arm],
                       out, stop_event=run.stop, turn_maker_for=lambda job: turn_maker(backend_spec(job), run, None),
                       progress=lambda done, total, key: progress(done / total, desc=f"{done}/{total} dialogues ({key})"))
    if result.written == 0:
        raise gr.Error(f"No dialogue finished ({result.failed} failed); see {out.name.replace('.jsonl', '.errors.jsonl')}.")
    report = write_reports(out, n_boot=500)
    figs, paths = report["figures"], report["paths"]
    status = (f"{result.written} dialogues in {result.elapsed_s:.0f} s ({result.failed} failed) "
              f"- arms: {', '.join(f'{a} ({len(d)})' for a, d in report['arms'].items())}")
    table = report["table"].drop(columns=["description"]).round(4)
    files = [str(paths[k]) for k in ("jsonl", "csv", "dialogues_csv", "html") if paths[k].exists()]
    return status, table, figs["survival"], figs["p_end"], figs["guardrails"], figs["comparison"], files


def build_batch_tab() -> None:
    """The tab's components and its ``batch_run`` event, inside the caller's open Blocks context."""
    gr.Markdown("Run many dialogues per intent with the current models and see the distributions. "
                "Tick guardrails below to add a **B arm** with them switched off (same seeds per intent and sample).")
    with gr.Row():
        intents_file = gr.File(label="Intents (.jsonl with 'intent' and 'id', or .txt one per line; empty: sample intents)",
                               file_types=[".jsonl", ".txt"], type="filepath")
        with gr.Column():
            samples = gr.Slider(1, 20, value=3, step=1, label="Samples per intent")
            max_turns = gr.Slider(1, 12, value=4, step=1, label="Max user turns")
            max_new_tokens = gr.Slider(8, 128, value=64, step=8, label="Max tokens per user turn")
    with gr.Row():
        assistant = gr.Dropdown(["local", "openai"], value="local", label="Assistant")
        base_url = gr.Textbox(label="Base URL (openai)", placeholder="http://localhost:8000/v1")
        model = gr.Textbox(label="Model (openai)")
    b_off = gr.CheckboxGroup(GUARDRAIL_CHOICES, label="B arm: guardrails switched off (none ticked: no B arm)")
    run = gr.Button("Run batch", variant="primary")
    status = gr.Markdown()
    table = gr.Dataframe(label="Metrics (value, 95% bootstrap interval; B - A with its interval)", wrap=True)
    with gr.Row():
        survival, p_end = gr.Plot(label="Survival"), gr.Plot(label="P(end) by turn")
    with gr.Row():
        guardrails, comparison = gr.Plot(label="Guardrails by turn"), gr.Plot(label="Metrics / A-B")
    files = gr.File(label="Downloads: JSONL, metrics CSV, per-dialogue CSV, HTML report", file_count="multiple")
    run.click(run_batch_ui, [intents_file, samples, max_turns, assistant, base_url, model, b_off, max_new_tokens],
              [status, table, survival, p_end, guardrails, comparison, files], api_name="batch_run",
              concurrency_id="batch", concurrency_limit=1)
