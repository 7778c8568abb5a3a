"""What each page event does: read the inputs, call the core, return the new view.

Every handler follows ``run_control``'s design: an event that cannot apply now is *refused*
(a toast, one log line, every output left as it was), never applied to a dialogue that a
run would then overwrite. Handlers take plain values so that tests call them directly.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from usersim_ui.analysis.charts import lengths_figure, p_end_figure
from usersim_ui.analysis.metrics import turn_table
from usersim_ui.analysis.safe_text import literal_markdown
from usersim_ui.analysis.transcript import badge_line, summary_text, to_markdown
from usersim_ui.app.form import Form
from usersim_ui.app.run_control import Run, RunControl, RunRefused
from usersim_ui.app.zerogpu import (
    USER_ERRORS,
    run_model_turn,
    simulator,
    uses_local_model,
)
from usersim_ui.assistants.registry import BackendSpec, make_backend
from usersim_ui.core import transitions as engine
from usersim_ui.core.dialogue import (
    Dialogue,
    dialogues_from_jsonl,
    dialogues_to_jsonl,
)
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.limits import (
    MAX_IMPORT_BYTES,
    MAX_IMPORT_DIALOGUES,
    MAX_TURN_CHARS,
    MAX_TURNS,
)

log = logging.getLogger("usersim_ui")
EXPORT_ROOT = Path(tempfile.gettempdir()) / "usersim_exports"
N_VIEW = 7  # state, chat, banner, lengths, p_end, summary, transcript


def _release_session(session: str, data: dict[str, object]) -> None:
    shutil.rmtree(EXPORT_ROOT / _safe_name(session), ignore_errors=True)


RUNS = RunControl(on_forget=_release_session)


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _safe_name(session: str) -> str:
    return "".join(c for c in session if c.isalnum())[:64] or "local"


def refuse(message: str, event: str, session: str) -> tuple[Any, ...]:
    """An expected refusal: a toast, one log line, and every output left as it was."""
    log.info("refused %s (session %s): %s", event, session[:8], message)
    gr.Warning(message)
    return tuple(gr.skip() for _ in range(N_VIEW))


def count_user_tokens(text: str) -> int:
    """Tokens as the simulated user's tokenizer counts them, so typed and model turns compare."""
    return len(simulator().tokenizer.encode(text, add_special_tokens=False))


# ---- rendering -----------------------------------------------------------------------------

def chat_messages(dialogue: Dialogue) -> list[dict[str, Any]]:
    """Chat bubbles: each turn's text shown literally, then its badge line as a separate
    folded message (title: the badge; body: guardrail decisions and rejected samples), so
    nothing a turn contains can break its badge."""
    messages: list[dict[str, Any]] = []
    for number, turn in enumerate(dialogue.turns, 1):
        text = literal_markdown(turn.text) if turn.text else ""
        if turn.ends_dialogue:
            text = (text + "\n\n" if text else "") + "*⟨ends the conversation: `<|endconversation|>`⟩*"
        messages.append({"role": turn.role, "content": text or "*(empty)*"})
        details = [f"- **{e.guardrail}** {e.action}: {literal_markdown(e.detail)}" for e in turn.guardrails]
        details += [f"- rejected (*{literal_markdown(r.reason)}*): {literal_markdown(r.text) or '(empty)'}"
                    for r in turn.rejected]
        if turn.seed is not None:
            details.append(f"- seed `{turn.seed}`")
        messages.append({"role": turn.role, "content": "\n".join(details) or "No guardrail acted.",
                         "metadata": {"title": f"#{number} · {badge_line(turn)}", "status": "done"}})
    return messages


def over_text(dialogue: Dialogue) -> str:
    """How the dialogue ended, in words."""
    if dialogue.ended_by == "user":
        at = next((n for n, t in enumerate(dialogue.turns, 1) if t.ends_dialogue), len(dialogue.turns))
        return f"Dialogue over: the simulated user ended it at turn {at}."
    if dialogue.ended_by == "turn_cap":
        return f"Dialogue over: the turn cap was reached ({dialogue.user_turns} user turns). Raise it to go on."
    return "Dialogue over: the researcher ended it."


def status_text(dialogue: Dialogue, running: str | None = None, notice: str | None = None) -> str:
    """The line under the dialogue: what is happening now, or what happened last."""
    if running:
        return running
    if notice:
        return notice
    if dialogue.ended_by:
        return over_text(dialogue)
    if dialogue.turns:
        return f"Next: the **{dialogue.next_role}**'s turn."
    return "Press **Step** or **Auto-run** to start."


def render(dialogue: Dialogue, running: str | None = None, notice: str | None = None) -> tuple[Any, ...]:
    """Every view of the dialogue, in the order of the page's ``view`` outputs."""
    table = turn_table(dialogue)
    return (dialogue, chat_messages(dialogue), status_text(dialogue, running, notice), lengths_figure(dialogue, table),
            p_end_figure(dialogue, table), summary_text(dialogue, running=bool(running)), to_markdown(dialogue))


def running_text(dialogue: Dialogue, settings: engine.RunSettings) -> str:
    role = dialogue.next_role
    number = dialogue.user_turns + 1 if role == "user" else dialogue.user_turns
    return f"Writing {role} turn {number} of {settings.max_turns}…"


# ---- model runs ----------------------------------------------------------------------------

def begin(dialogue: Dialogue | None, intent: str) -> Dialogue:
    """The dialogue to continue; before its first turn it takes the intent box as it is now."""
    if dialogue is None or not dialogue.turns:
        return replace(dialogue or Dialogue(intent=""), intent=engine.validate_intent(intent),
                       user_model=simulator().model_id)
    return dialogue


def live_settings(session: str) -> engine.RunSettings | None:
    return RUNS.session_data(session).get("settings")  # type: ignore[return-value]


def set_live_settings(session: str, settings: engine.RunSettings) -> None:
    RUNS.session_data(session)["settings"] = settings


def turn_maker(spec: BackendSpec, run: Run, regenerate_from: Dialogue | None
               ) -> Callable[[Dialogue, engine.RunSettings], Dialogue]:
    """One turn of a run: local-model turns through the GPU function and the model slot;
    endpoint and researcher turns straight here (no GPU slice, no slot)."""
    def make(dialogue: Dialogue, settings: engine.RunSettings) -> Dialogue:
        if run.stop.is_set():
            raise GenerationCancelled("stopped between turns")
        # None: the engine's default, the seed scheme's seed for this position
        seed = engine.regeneration_seed(regenerate_from, settings) if regenerate_from is not None else None
        if not uses_local_model(dialogue, spec):
            return engine.assistant_turn(dialogue, make_backend(spec), settings, run.stop, seed)
        with RUNS.model_slot(run):
            return run_model_turn(dialogue, settings, spec, seed, run.stop)
    return make


def run_turns(dialogue: Dialogue | None, intent: str, form: Form, session: str, role: str | None,
              max_new_turns: int | None, regenerate: bool = False, event: str = "run") -> Iterator[tuple[Any, ...]]:
    """Make turns and stream each into the view. Stop, End, Reset or an error keep every turn
    made so far (Regenerate keeps the original turn unless a new one was made)."""
    try:
        settings, spec = form.settings, form.backend
        if regenerate:
            if dialogue is None or not dialogue.turns:
                raise ValueError("Nothing to regenerate yet.")
            original, start = dialogue, engine.undo(dialogue)
        else:
            original = start = begin(dialogue, intent)
        if role is not None and start.next_role != role:
            raise ValueError(f"It is the {start.next_role}'s turn.")
        if start.next_role == "assistant" and spec.kind == "researcher":
            raise engine.NeedsResearcher("You are the assistant: type the reply and press Send.")
        start = engine.ensure_open(start, settings)
        with RUNS.start(session) as run:
            yield from _run(run, original, start, settings, spec, session, max_new_turns, regenerate)
    except (RunRefused, *USER_ERRORS) as exc:
        yield refuse(str(exc), event, session)


def _run(run: Run, original: Dialogue, start: Dialogue, settings: engine.RunSettings, spec: BackendSpec,
         session: str, max_new_turns: int | None, regenerate: bool) -> Iterator[tuple[Any, ...]]:
    set_live_settings(session, settings)
    now = lambda: live_settings(session) or settings  # noqa: E731 - toggles moved mid-run apply next turn
    current, notice = start, None
    yield render(original, running=running_text(start, settings))
    try:
        for current in engine.run(start, turn_maker(spec, run, original if regenerate else None), now,
                                  max_new_turns):
            yield render(current, running=None if current.ended_by else running_text(current, now()))
    except GenerationCancelled:
        notice = "Stopped. The dialogue so far is kept."
    except (gr.Error, *USER_ERRORS) as exc:
        message = exc.message if isinstance(exc, gr.Error) else str(exc)
        log.info("run ended early (session %s): %s", session[:8], message)
        gr.Warning(message)
        notice = f"⚠ {message.rstrip('.')}. The dialogue so far is kept."
    kept = original if regenerate and current is start else current
    final = RUNS.finish(run, kept)
    yield render(final, notice=notice if final is kept else None)


# ---- events that change the dialogue without a model ---------------------------------------

def guarded(event: str, session: str, fn: Callable[[], Dialogue], while_running: str) -> tuple[Any, ...]:
    """Apply a quick transition unless a run is in flight; refuse with a toast otherwise."""
    try:
        RUNS.refuse_if_running(session, while_running)
        return render(fn())
    except (RunRefused, *USER_ERRORS) as exc:
        return refuse(str(exc), event, session)


def cancel_then(event: str, session: str, dialogue: Dialogue | None,
                transition: Callable[[Dialogue], Dialogue]) -> tuple[Any, ...]:
    """End and Reset: stop any run and make the transition its last word."""
    try:
        final = RUNS.cancel_then(session, transition)
        if final is None:
            final = transition(dialogue if dialogue is not None else Dialogue(intent=""))
        return render(final)
    except (RunRefused, *USER_ERRORS) as exc:
        return refuse(str(exc), event, session)


def send_reply(dialogue: Dialogue | None, intent: str, text: str, settings: engine.RunSettings,
               session: str) -> tuple[Any, ...]:
    """The researcher's typed turn; the reply box empties only when the turn was taken."""
    try:
        RUNS.refuse_if_running(session, "Sending a reply")
        return render(engine.researcher_turn(begin(dialogue, intent), text, settings, count_user_tokens)) + ("",)
    except (RunRefused, *USER_ERRORS) as exc:
        return refuse(str(exc), "send_reply", session) + (gr.skip(),)


def export_file(dialogue: Dialogue | None, session: str) -> str:
    """The dialogue as a JSONL file in the session's own folder (replaced on each export,
    removed when the session ends)."""
    if dialogue is None or not dialogue.turns:
        raise gr.Error("Nothing to export yet.", print_exception=False)
    folder = EXPORT_ROOT / _safe_name(session)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    RUNS.session_data(session)  # tracked from now on, so an idle session's folder is removed too
    path = folder / f"dialogue-{dialogue.id}.jsonl"
    path.write_text(dialogues_to_jsonl([dialogue]), encoding="utf-8")
    return str(path)


def load_example(path: Path, session: str) -> tuple[Any, ...]:
    """A gallery dialogue into the page, as an import would (refused while a run is in flight)."""
    return import_file(str(path), session)


def import_file(file: Any, session: str) -> tuple[Any, ...]:
    """The first dialogue of an uploaded JSONL file, every field checked."""
    if file is None:
        return tuple(gr.skip() for _ in range(N_VIEW + 1))
    try:
        RUNS.refuse_if_running(session, "Importing")
        path = Path(file if isinstance(file, str) else file.name)
        size = path.stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise ValueError(f"The file is {size / 2**20:.1f} MB; the limit is {MAX_IMPORT_BYTES / 2**20:.0f} MB.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("The file is not UTF-8 text.") from exc
        dialogues = dialogues_from_jsonl(text, max_text_chars=MAX_TURN_CHARS, max_turns=MAX_TURNS,
                                         max_dialogues=MAX_IMPORT_DIALOGUES)
        if not dialogues:
            raise ValueError("The file holds no dialogue.")
        for number, imported in enumerate(dialogues, 1):
            try:
                engine.validate_intent(imported.intent)
            except ValueError as exc:
                raise ValueError(f"dialogue {number}: {exc}") from exc
    except (RunRefused, ValueError, OSError) as exc:
        return refuse(f"Could not import: {exc}", "import_jsonl", session) + (gr.skip(),)
    if len(dialogues) > 1:
        gr.Info(f"The file holds {len(dialogues)} dialogues; showing the first.")
    return render(dialogues[0]) + (dialogues[0].intent,)
