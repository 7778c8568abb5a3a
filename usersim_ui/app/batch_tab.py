"""The "Batch" tab: many dialogues at once, their distributions and an optional A/B arm.

``build_batch_tab()`` is called by ``app.studio`` inside an open ``gr.Blocks()`` / ``gr.Tab``
context. The handler, :func:`run_batch_ui`, is a plain function (tests call it directly) and
is exposed as the API event ``batch_run``. One batch runs at a time in the app; it is the
session's run in ``run_control``; each of its turns is made as the Studio tab makes one
(``handlers.turn_maker``): a local-model turn runs in ``zerogpu.model_turn_stream`` (a ZeroGPU slice on
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr

from usersim_ui.analysis.distribution import format_value, metric_name
from usersim_ui.analysis.safe_text import literal_line
from usersim_ui.app import trust
from usersim_ui.assistants.registry import (
    BATCH_CHOICES,
    BackendSpec,
    needs_endpoint,
    spec_text,
)
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
from usersim_ui.core.guardrails import GUARDRAILS, parse_guardrails
from usersim_ui.core.intents import SampleIntent, load_sample_intents

GUARDRAIL_CHOICES = [g.name for g in GUARDRAILS if g.field is not None]  # what a B arm can switch off
ASSISTANT_MAX_TOKENS = 128
MAX_DIALOGUES = 400  # a page is not the place for more: use python -m usersim_ui.batch
# The plan line's estimate before this session has run a batch: seconds per token of a user turn's
# budget (max tokens per user turn + the assistant's ASSISTANT_MAX_TOKENS), from the recorded 12x3
# run on the CPU defaults (docs/benchmarks.md: 84 user turns with their replies in 2616.7 s on 2
# shared cores, 96 + 128 tokens per turn: 31.2 s per turn, 0.14 s per token). After a batch, the
# session's own measured rate replaces it.
CPU_S_PER_TOKEN = 2616.7 / 84 / (96 + 128)


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


def sample_choices() -> list[tuple[str, str]]:
    """The sample intents as the checklist shows them: "category · title", grouped by category."""
    return [(f"{i.category} · {i.title}", i.id) for i in sorted(load_sample_intents(), key=lambda i: i.category)]


def counted(n: int, noun: str) -> str:
    """``1 dialogue``, ``2 dialogues``: a count a person reads."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_line(intents_file: Any, samples: float, max_turns: float, b_off: list[str] | None, max_new_tokens: float,
              sample_ids: list[str] | None, request: gr.Request | None = None) -> str:
    """What Run will do, before it starts: dialogues, user turns at most, and an estimated time
    (this session's measured seconds per token after a batch, else :data:`CPU_S_PER_TOKEN`)."""
    from usersim_ui.app.handlers import RUNS, session_of

    try:
        grid = BatchGrid.parse(intents_file, samples, max_turns, b_off, max_new_tokens, sample_ids)
    except ValueError as exc:
        return f"**Plan:** {literal_line(str(exc))}"
    intents, n_samples, arms, n_tokens = grid.intents, grid.samples, grid.arm_count, grid.max_new_tokens
    dialogues = grid.dialogues
    turns = dialogues * grid.max_turns
    measured = RUNS.session_data(session_of(request)).get("batch_s_per_token")
    rate = float(measured) if isinstance(measured, (int, float)) else CPU_S_PER_TOKEN
    source = ("measured in this session's last batch" if measured is not None
              else "CPU estimate from the recorded 12x3 run on 2 cores")
    where = "the uploaded file" if intents_file else ("the ticked sample intents" if sample_ids else "all sample intents")
    line = (f"**Plan:** {counted(len(intents), 'intent')} ({where}) × {counted(n_samples, 'sample')} × "
            f"{counted(arms, 'arm')} = **{counted(dialogues, 'dialogue')}**, "
            f"at most **{counted(turns, 'user turn')}** with their replies; estimated at most **{_duration(turns * (n_tokens + ASSISTANT_MAX_TOKENS) * rate)}** "
            f"({rate:.3f} s per token of budget, {source}).")
    if intents_file and sample_ids:
        line += " The checklist is ignored while a file is uploaded."
    if dialogues > MAX_DIALOGUES:
        line += f" Too many for the page (at most {MAX_DIALOGUES}): use python -m usersim_ui.batch."
    return line


def stop_batch(request: gr.Request | None = None) -> None:
    """The tab's Stop: stops the session's run (the batch), keeping every finished dialogue."""
    from usersim_ui.app.handlers import RUNS, session_of

    RUNS.stop(session_of(request))


def clear_stop(request: gr.Request | None = None) -> None:
    """A new Run click supersedes a Stop pressed when nothing ran (as the Studio's buttons do)."""
    from usersim_ui.app.handlers import RUNS, session_of

    RUNS.clear_stop(session_of(request))


def display_table(table: Any) -> Any:
    """The metrics table as the tab shows it: names instead of ids, P(end) in scientific notation
    (a mean of 3e-5 is not 0), other values to 4 significant digits."""
    shown = table.drop(columns=["description"]).copy()
    ids = list(shown["metric"])
    for column in shown.columns:
        if column != "metric" and shown[column].dtype.kind == "f":
            shown[column] = [format_value(m, v) for m, v in zip(ids, shown[column])]
    shown["metric"] = [metric_name(m) for m in ids]
    return shown


@dataclass(frozen=True)
class BatchGrid:
    """What the tab's boxes ask for, parsed once through the trust boundary: the plan line and
    the run read the same values (and a bad box is refused before a run starts)."""

    intents: list[SampleIntent]
    problems: list[str]  # lines of an uploaded file that cannot run (listed, skipped)
    samples: int
    max_turns: int
    max_new_tokens: int
    b_off: list[str]  # guardrails the B arm switches off (none: no B arm)

    @classmethod
    def parse(cls, intents_file: Any, samples: Any, max_turns: Any, b_off: Any, max_new_tokens: Any,
              sample_ids: Any = None) -> "BatchGrid":
        intents, problems = _intents(intents_file, sample_ids)
        return cls(intents, problems, int(trust.number(samples, "Samples per intent", 1, 20)),
                   int(trust.number(max_turns, "Max user turns", 1, 30)),
                   int(trust.number(max_new_tokens, "Max tokens per user turn", 1, 256)),
                   trust.choices(b_off, "B arm", GUARDRAIL_CHOICES))

    def arms(self, assistant: str) -> list[Arm]:
        """Arm A, and B with ``b_off`` switched off (same seeds per intent and sample)."""
        a = [Arm("A", assistant)]
        return a + [Arm("B", assistant, parse_guardrails(",".join(f"{g}=0" for g in self.b_off)))] if self.b_off else a

    @property
    def arm_count(self) -> int:
        return 2 if self.b_off else 1

    @property
    def dialogues(self) -> int:
        return len(self.intents) * self.samples * self.arm_count


def assistant_spec(assistant: Any, base_url: Any, model: Any, api_key: Any) -> BackendSpec:
    """The tab's assistant through the Studio's trust boundary (``trust.backend``): the host's key
    only to an endpoint the host trusts, any other gets ``api_key``, the visitor's own; each kind
    at its default model."""
    kind = trust.choice(assistant, "Assistant", [name for _label, name in BATCH_CHOICES])
    default = BackendSpec()
    return trust.backend(kind, default.system_prompt, default.temperature, ASSISTANT_MAX_TOKENS,
                         base_url, model if needs_endpoint(kind) else "", api_key)


def run_batch_ui(intents_file: Any, samples: float, max_turns: float, assistant: str, base_url: str, model: str,
                 b_off: list[str] | None, max_new_tokens: float = 64, api_key: str = "",
                 sample_ids: list[str] | None = None, progress: Any = gr.Progress(),
                 request: gr.Request | None = None) -> tuple:
    """Run the batch in-process and return (status, metrics table, 4 figures, files).

    ``sample_ids``: the sample intents ticked in the checklist (none: all of them; an uploaded
    file takes precedence). The batch is this session's run (``run_control``): Stop on this tab
    or in the Studio stops it and keeps every finished dialogue, it is refused while the session
    has another run, and its model calls take the shared model slot.
    Every value passes the trust boundary (``app.trust``) first: the host's ``OPENAI_API_KEY``
    goes only to an endpoint the host trusts; any other gets ``api_key``, the visitor's own.
    """
    from usersim_ui.app.handlers import RUNS, session_of, visitor_of
    from usersim_ui.app.run_control import RunRefused

    session = session_of(request)
    try:
        grid = BatchGrid.parse(intents_file, samples, max_turns, b_off, max_new_tokens, sample_ids)
        endpoint = assistant_spec(assistant, base_url, model, api_key)
        with RUNS.start(session, visitor_of(request)) as run:  # counts against the visitor's cap too
            folder = SessionFolder(output_dir() / _folder_name(session))
            RUNS.session_data(session)["batch_folder"] = folder  # the session's previous batch folder goes
            return _run_batch(run, folder.path, grid, endpoint, progress, session)
    except (RunRefused, ValueError, OSError) as exc:
        raise gr.Error(str(exc), print_exception=False) from exc


def _intents(intents_file: Any, sample_ids: list[str] | None = None) -> tuple[list[SampleIntent], list[str]]:
    """The uploaded intents that can run, and the lines that cannot (listed, skipped); without
    an upload, the ticked sample intents (none ticked: all of them)."""
    path = trust.uploaded_file(intents_file, "Intents", INTENT_SUFFIXES, trust.MAX_INTENTS_FILE_BYTES)
    if path is None and sample_ids:
        ticked = trust.choices(sample_ids, "Sample intents", [i.id for i in load_sample_intents()])
        return [i for i in load_sample_intents() if i.id in set(ticked)], []
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


def _run_batch(run: Any, folder: Path, grid: BatchGrid, endpoint: BackendSpec, progress: Any,
               session: str = "") -> tuple:
    from usersim_ui.app.handlers import turn_maker
    from usersim_ui.app.zerogpu import simulator
    from usersim_ui.core.transitions import RunSettings

    problems, n_turns, n_tokens = grid.problems, grid.max_turns, grid.max_new_tokens
    arms = grid.arms(spec_text(endpoint))  # the spec string the records and the report name (never the key)
    if grid.dialogues > MAX_DIALOGUES:
        raise ValueError(f"{grid.dialogues} dialogues is too many for the page (at most "
                         f"{MAX_DIALOGUES}); use python -m usersim_ui.batch for large runs.")
    jobs = plan(grid.intents, grid.samples, arms)
    sampling = SamplingSettings(max_new_tokens=n_tokens)
    settings = {a.name: RunSettings(guardrails=a.guardrails, sampling=sampling, max_turns=n_turns) for a in arms}
    user = simulator()

    out = folder / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    budget = len(jobs) * n_turns  # user turns at most; a dialogue that ends early counts its whole budget once done
    state = {"finished": 0, "made": 0, "current": ""}
    made_in: dict[str, int] = {}

    def on_turn(job: Any, dialogue: Any) -> None:
        made_in[job.key] = dialogue.user_turns
        made = sum(made_in.values())
        current = made_in[job.key]
        index = state["finished"] + 1
        done = min(state["finished"] * n_turns + current, budget)
        progress(done / budget, desc=f"user turns: {made} made (at most {budget}) · dialogue {index}/{len(jobs)} "
                                     f"({job.key}) at user turn {current}/{n_turns}")

    def on_dialogue(done: int, total: int, key: str) -> None:
        state["finished"] += 1
        progress(min(state["finished"] * n_turns, budget) / budget,
                 desc=f"{done}/{total} dialogues done ({key}) · {sum(made_in.values())} user turns made")

    progress(0, desc=f"user turns: 0 made (at most {budget}) · dialogue 1/{len(jobs)}")
    # every turn as the Studio tab makes it: local-model turns in the @spaces.GPU function (a ZeroGPU
    # slice on a Space) behind the shared model slot, endpoint turns straight from here
    # no backend object here: turn_maker builds it where the turn runs (a local model only in the GPU function)
    result = run_batch(jobs, lambda job: user, lambda job: None, lambda job: settings[job.arm],
                       out, stop_event=run.stop,
                       turn_maker_for=lambda job: turn_maker(replace(endpoint, seed=job.seed), run, None),
                       progress=on_dialogue, on_turn=on_turn)
    made = sum(made_in.values())
    if made and result.elapsed_s > 0 and session:  # the plan line's next estimate: this session's own rate
        from usersim_ui.app.handlers import RUNS

        RUNS.session_data(session)["batch_s_per_token"] = result.elapsed_s / (made * (n_tokens + ASSISTANT_MAX_TOKENS))
    if result.written == 0:
        if result.stopped:
            raise ValueError("Stopped before any dialogue finished: nothing to keep.")
        raise ValueError(f"No dialogue finished ({result.failed} failed); see {errors_path(out).name}.")
    report = write_reports(out, n_boot=500)
    figs, paths = report["figures"], report["paths"]
    arms_line = ", ".join(f"{a} ({len(d)})" for a, d in report["arms"].items())
    if result.stopped:
        status = (f"Stopped: {result.written} of {counted(len(jobs), 'dialogue')} finished and kept "
                  f"({counted(made, 'user turn')} in "
                  f"{result.elapsed_s:.0f} s; {result.failed} failed) - arms: {arms_line}. The dialogue that was "
                  "running is not kept.")
    else:
        status = (f"{counted(result.written, 'dialogue')} in {result.elapsed_s:.0f} s ({result.failed} failed) "
                  f"- arms: {arms_line}")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        status += f"\n\nSkipped {counted(len(problems), 'line')} of the intents file: {literal_line(shown)}."
    table = display_table(report["table"])
    files = [str(paths[k]) for k in ("jsonl", "csv", "dialogues_csv", "html", "errors") if paths[k].exists()]
    return status, table, figs["survival"], figs["p_end"], figs["guardrails"], figs["comparison"], files


def build_batch_tab() -> None:
    """The tab's components and its ``batch_run`` event, inside the caller's open Blocks context."""
    gr.Markdown("Run many dialogues per intent with the current models and see the distributions. "
                "Tick guardrails below to add a **B arm** with them switched off (same seeds per intent and sample).")
    with gr.Row():
        with gr.Column():
            sample_ids = gr.CheckboxGroup(sample_choices(), label="Sample intents (category · title; none ticked: all)",
                                          elem_id="batch-intents")
            intents_file = gr.File(label="Or upload intents (.jsonl with 'intent' and 'id', or .txt one per line)",
                                   file_types=[".jsonl", ".txt"], type="filepath")
        with gr.Column():
            samples = gr.Slider(1, 20, value=3, step=1, label="Samples per intent", elem_id="batch-samples")
            max_turns = gr.Slider(1, 12, value=4, step=1, label="Max user turns", elem_id="batch-turns")
            max_new_tokens = gr.Slider(8, 128, value=64, step=8, label="Max tokens per user turn", elem_id="batch-tokens")
    with gr.Row():
        assistant = gr.Dropdown(BATCH_CHOICES, value=BATCH_CHOICES[0][1], label="Assistant", elem_id="batch-assistant",
                                scale=2, min_width=300)  # its labels are long: room to read them
        base_url = gr.Textbox(label="Base URL (openai)", placeholder="http://localhost:8000/v1", elem_id="batch-url")
        model = gr.Textbox(label="Model (openai)", elem_id="batch-model")
        api_key = gr.Textbox(label="API key (openai; sent only to this URL, never stored)", type="password")
    b_off = gr.CheckboxGroup(GUARDRAIL_CHOICES, label="B arm: guardrails switched off (none ticked: no B arm)")
    plan = gr.Markdown(plan_line(None, 3, 4, [], 64, None), elem_id="batch-plan")
    with gr.Row():
        run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
        stop = gr.Button("Stop batch", variant="stop", elem_id="batch-stop")
    status = gr.Markdown(elem_id="batch-status")
    table = gr.Dataframe(label="Metrics (value, 95% bootstrap interval; B - A with its interval)", wrap=True,
                         elem_id="batch-table", headers=["metric", "A", "A_lo", "A_hi"])  # until a run fills it
    with gr.Row():
        survival, p_end = gr.Plot(label="Survival"), gr.Plot(label="P(end) by turn")
    with gr.Row():
        guardrails, comparison = gr.Plot(label="Guardrails by turn"), gr.Plot(label="Metrics / A-B")
    files = gr.File(label="Downloads: JSONL, metrics CSV, per-dialogue CSV, HTML report", file_count="multiple",
                    elem_id="batch-files")
    plan_inputs = [intents_file, samples, max_turns, b_off, max_new_tokens, sample_ids]
    for component in plan_inputs:
        component.change(plan_line, plan_inputs, plan, queue=False, api_name=False, show_progress="hidden")
    run.click(clear_stop, None, None, queue=False, api_name=False).then(
        run_batch_ui, [intents_file, samples, max_turns, assistant, base_url, model, b_off, max_new_tokens, api_key,
                       sample_ids],
        [status, table, survival, p_end, guardrails, comparison, files], api_name="batch_run",
        concurrency_id="batch", concurrency_limit=1)
    stop.click(stop_batch, None, None, queue=False, api_name="batch_stop")
