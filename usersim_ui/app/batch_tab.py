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

import shutil
import tempfile
import time
import uuid
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr

from usersim_ui.analysis.safe_text import literal_line
from usersim_ui.app import trust
from usersim_ui.assistants.registry import BackendSpec
from usersim_ui.batch.runner import (
    INTENT_SUFFIXES,
    INTENTS_SHAPE,
    Arm,
    errors_path,
    plan,
    read_intents,
    run_batch,
    write_reports,
)
from usersim_ui.core.dialogue import SamplingSettings
from usersim_ui.core.intents import SampleIntent
from usersim_ui.core.guardrails import GUARDRAILS, parse_guardrails

GUARDRAIL_CHOICES = [g.name for g in GUARDRAILS]
ASSISTANT_MAX_TOKENS = 128
MAX_DIALOGUES = 400  # a page is not the place for more: use python -m usersim_ui.batch


def output_dir() -> Path:
    """Under the temp dir, which Gradio serves downloads from without allowed_paths."""
    path = Path(tempfile.gettempdir()) / "usersim_batch"
    path.mkdir(parents=True, exist_ok=True)
    return path


class SessionFolder:
    """One batch's output folder, alive as long as something holds this object.

    The session's data in ``run_control`` holds it (as the Studio's export folder is tied to
    the session): when the session is forgotten (its tab closed, or idle past the TTL) its data
    is dropped and the folder goes with it; the session's next batch replaces it, and so removes
    it; and whatever is left goes when the process exits. While a batch writes to it, the
    handler holds it too, so a tab closed mid-run removes it only once the run has wound down.
    """

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._remove = weakref.finalize(self, shutil.rmtree, str(path), True)


def _folder_name(session: str) -> str:
    safe = "".join(c for c in session if c.isalnum())[:32] or "local"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_batch_ui(intents_file: Any, samples: float, max_turns: float, assistant: str, base_url: str, model: str,
                 b_off: list[str] | None, max_new_tokens: float = 64, api_key: str = "", progress: Any = gr.Progress(),
                 request: gr.Request | None = None) -> tuple:
    """Run the batch in-process and return (status, metrics table, 4 figures, files).

    The batch is this session's run (``run_control``): Stop in the Studio tab stops it, it is
    refused while the session has another run, and its model calls take the shared model slot.
    Every value passes the trust boundary (``app.trust``) first: the host's ``OPENAI_API_KEY``
    goes only to an endpoint the host trusts; any other gets ``api_key``, the visitor's own.
    """
    from usersim_ui.app.handlers import RUNS, session_of, visitor_of
    from usersim_ui.app.run_control import RunRefused

    session = session_of(request)
    try:
        with RUNS.start(session, visitor_of(request)) as run:  # counts against the visitor's cap too
            folder = SessionFolder(output_dir() / _folder_name(session))
            RUNS.session_data(session)["batch_folder"] = folder  # the session's previous batch folder goes
            return _run_batch(run, folder.path, intents_file, samples, max_turns, assistant, base_url, model, b_off,
                              max_new_tokens, api_key, progress)
    except (RunRefused, ValueError, OSError) as exc:
        raise gr.Error(str(exc), print_exception=False) from exc


def _intents(intents_file: Any) -> tuple[list[SampleIntent], list[str]]:
    """The uploaded intents that can run, and the lines that cannot (listed, skipped)."""
    path = trust.uploaded_file(intents_file, "Intents", INTENT_SUFFIXES, trust.MAX_INTENTS_FILE_BYTES)
    try:
        found = read_intents(str(path) if path is not None else "sample")
    except OSError:
        raise ValueError("Intents: the uploaded file could not be read; upload it again.") from None
    except ValueError as exc:
        raise ValueError(f"Intents: {exc}.") from None
    if not found.intents:
        listed = "; ".join(found.problems[:10]) or "the file is empty"
        raise ValueError(f"Intents: no line of the file holds an intent that can run ({listed}); {INTENTS_SHAPE}.")
    return found.intents, found.problems


def _run_batch(run: Any, folder: Path, intents_file: Any, samples: float, max_turns: float, assistant: str,
               base_url: str, model: str, b_off: list[str] | None, max_new_tokens: float, api_key: str,
               progress: Any) -> tuple:
    from usersim_ui.app.handlers import turn_maker
    from usersim_ui.app.zerogpu import simulator
    from usersim_ui.core.transitions import RunSettings

    intents, problems = _intents(intents_file)
    n_samples = int(trust.number(samples, "Samples per intent", 1, 20))
    n_turns = int(trust.number(max_turns, "Max user turns", 1, 30))
    n_tokens = int(trust.number(max_new_tokens, "Max tokens per user turn", 1, 256))
    kind = trust.choice(assistant, "Assistant", ["local", "openai"])
    off = trust.choices(b_off, "B arm", GUARDRAIL_CHOICES)
    if kind == "openai":
        url, served = trust.endpoint_url(base_url), trust.endpoint_model(model)
        endpoint = BackendSpec(kind="openai", base_url=url, model=served, max_tokens=ASSISTANT_MAX_TOKENS,
                               api_key=trust.api_key(api_key, url))
        spec = f"openai:{url}:{served}"
    else:
        endpoint, spec = BackendSpec(kind="local", max_tokens=ASSISTANT_MAX_TOKENS), "local"
    arms = [Arm("A", spec)]
    if off:
        arms.append(Arm("B", spec, parse_guardrails(",".join(f"{g}=0" for g in off))))
    if len(intents) * n_samples * len(arms) > MAX_DIALOGUES:
        raise ValueError(f"{len(intents) * n_samples * len(arms)} dialogues is too many for the page (at most "
                         f"{MAX_DIALOGUES}); use python -m usersim_ui.batch for large runs.")
    jobs = plan(intents, n_samples, arms)
    sampling = SamplingSettings(max_new_tokens=n_tokens)
    settings = {a.name: RunSettings(guardrails=a.guardrails, sampling=sampling, max_turns=n_turns) for a in arms}
    user = simulator()

    out = folder / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    progress(0, desc=f"0/{len(jobs)} dialogues")
    # every turn as the Studio tab makes it: local-model turns in the @spaces.GPU function (a ZeroGPU
    # slice on a Space) behind the shared model slot, endpoint turns straight from here
    # no backend object here: turn_maker builds it where the turn runs (a local model only in the GPU function)
    result = run_batch(jobs, lambda job: user, lambda job: None, lambda job: settings[job.arm],
                       out, stop_event=run.stop,
                       turn_maker_for=lambda job: turn_maker(replace(endpoint, seed=job.seed), run, None),
                       progress=lambda done, total, key: progress(done / total, desc=f"{done}/{total} dialogues ({key})"))
    if result.written == 0:
        raise ValueError(f"No dialogue finished ({result.failed} failed); see {errors_path(out).name}.")
    report = write_reports(out, n_boot=500)
    figs, paths = report["figures"], report["paths"]
    status = (f"{result.written} dialogues in {result.elapsed_s:.0f} s ({result.failed} failed) "
              f"- arms: {', '.join(f'{a} ({len(d)})' for a, d in report['arms'].items())}")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        status += f"\n\nSkipped {len(problems)} line(s) of the intents file: {literal_line(shown)}."
    table = report["table"].drop(columns=["description"]).round(4)
    files = [str(paths[k]) for k in ("jsonl", "csv", "dialogues_csv", "html", "errors") if paths[k].exists()]
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
        api_key = gr.Textbox(label="API key (openai; sent only to this URL, never stored)", type="password")
    b_off = gr.CheckboxGroup(GUARDRAIL_CHOICES, label="B arm: guardrails switched off (none ticked: no B arm)")
    run = gr.Button("Run batch", variant="primary")
    status = gr.Markdown()
    table = gr.Dataframe(label="Metrics (value, 95% bootstrap interval; B - A with its interval)", wrap=True)
    with gr.Row():
        survival, p_end = gr.Plot(label="Survival"), gr.Plot(label="P(end) by turn")
    with gr.Row():
        guardrails, comparison = gr.Plot(label="Guardrails by turn"), gr.Plot(label="Metrics / A-B")
    files = gr.File(label="Downloads: JSONL, metrics CSV, per-dialogue CSV, HTML report", file_count="multiple")
    run.click(run_batch_ui, [intents_file, samples, max_turns, assistant, base_url, model, b_off, max_new_tokens,
                             api_key],
              [status, table, survival, p_end, guardrails, comparison, files], api_name="batch_run",
              concurrency_id="batch", concurrency_limit=1)
