"""What each page event does: read the inputs, call the core, return the new view.

Every handler follows ``run_control``'s design: the dialogue to change is the session's latest
(held by ``RUNS``, not the page's possibly stale state), every change is committed there, and an
event that cannot apply now is *refused* (one log line; on the page a toast with every output
left as it was, to an API caller a ``gr.Error`` with the reason), never applied to a dialogue
that a run would then overwrite. Handlers take plain values so that tests call them directly.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import gradio as gr

from usersim_ui.analysis.charts import lengths_figure, p_end_figure
from usersim_ui.analysis.metrics import turn_table
from usersim_ui.analysis.safe_text import literal_line, literal_markdown
from usersim_ui.analysis.transcript import badge_line, summary_text, to_markdown
from usersim_ui.app.form import Form
from usersim_ui.app.run_control import Run, RunControl, RunRefused
from usersim_ui.app.streaming import with_drafts
from usersim_ui.app.trust import Refused
from usersim_ui.app.zerogpu import (
    USER_ERRORS,
    run_model_turn,
    simulator,
    uses_local_model,
)
from usersim_ui.assistants.registry import BackendSpec, make_backend, researcher_types
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import (
    Dialogue,
    dialogues_from_jsonl,
    dialogues_to_jsonl,
)
from usersim_ui.core.errors import GenerationCancelled
from usersim_ui.core.limits import (
    MAX_IMPORT_BYTES,
    MAX_IMPORT_DIALOGUES,
    MAX_INTENT_CHARS,
    MAX_TURN_CHARS,
    MAX_TURNS,
)
from usersim_ui.core.protocols import Draft, OnDraft

log = logging.getLogger("usersim_ui")
EXPORT_ROOT = Path(tempfile.gettempdir()) / "usersim_exports"
N_VIEW = 7  # state, chat, banner, lengths, p_end, summary, transcript
START_TEXT = ("Write a task intent, or click a sample intent, to start: **Step** makes one exchange, "
              "**Auto-run** goes on until the user ends it.")


def _release_session(session: str, data: dict[str, object]) -> None:
    shutil.rmtree(EXPORT_ROOT / _safe_name(session), ignore_errors=True)


RUNS = RunControl(on_forget=_release_session)


def configure_logging(level: int = logging.INFO) -> None:
    """Print the app's log lines (refusals, runs that ended early) on stderr, where a host or a
    Space's log shows them: without this Python drops INFO, so no refusal was ever printed.
    A host that configured logging itself (a root handler) keeps its own setup."""
    log.setLevel(level)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def is_page(request: gr.Request | None) -> bool:
    """Whether the event came from the page (gradio's browser client sends ``x-gradio-user: app``;
    gradio_client sends ``api``). Only decides how a refusal is delivered, so a forged header
    gains nothing."""
    headers = getattr(request, "headers", None)
    return request is None or headers is None or headers.get("x-gradio-user") == "app"


def session_of(request: gr.Request | None) -> str:
    """The session's key; notes whether it is the page's or an API caller's (a session is one
    or the other for its whole life), which :func:`refuse` reads."""
    session = getattr(request, "session_hash", None) or "local"
    if request is not None and not is_page(request):
        RUNS.session_data(session)["api"] = True
    return session


def visitor_of(request: gr.Request | None) -> str | None:
    """The visitor a run counts against (RunControl.per_visitor): the client's address as
    uvicorn resolved it (behind a proxy, uvicorn reads X-Forwarded-For from the addresses in
    FORWARDED_ALLOW_IPS; see README "Hosting in public")."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None


def _safe_name(session: str) -> str:
    return "".join(c for c in session if c.isalnum())[:64] or "local"


def refuse(message: str, event: str, session: str) -> tuple[Any, ...]:
    """An expected refusal: one log line, then on the page a toast with every output left as
    it was, and to an API caller a gr.Error carrying the reason (the dialogue is unchanged)."""
    log.info("refused %s (session %s): %s", event, session[:8], " ".join(message.split()))
    if RUNS.session_data(session).get("api"):
        raise gr.Error(message, title="Refused", print_exception=False)
    gr.Warning(message)
    return tuple(gr.skip() for _ in range(N_VIEW))


def notice_only(text: str) -> tuple[Any, ...]:
    """Only the status line changes (the dialogue and its views stay as they are)."""
    return (gr.skip(), gr.skip(), text) + tuple(gr.skip() for _ in range(N_VIEW - 3))


def status_only(dialogue: Dialogue, running: str | None = None, notice: str | None = None) -> tuple[Any, ...]:
    """The status line and summary of a dialogue the page already shows: rendering its chat and
    charts again costs ~0.25 s of CPU, which a visitor starting and stopping runs in a loop
    would otherwise make the server spend twice a cycle."""
    return (gr.skip(), gr.skip(), status_text(dialogue, running, notice), gr.skip(), gr.skip(),
            summary_text(dialogue, running=bool(running)), gr.skip())


def checked_numbers(components: Iterable[Any]) -> None:
    """Number and Slider boxes hand a value that is not a number, or is out of the box's bounds,
    to the handler as a :class:`trust.Refused` carrying a message with the box's name, and the
    handler refuses the event (a toast on the page, an error with the reason to an API caller).

    Gradio's own preprocessing compares such a value with the box's bounds and fails with a
    TypeError, which reaches an API caller as "The upstream Gradio app has raised an exception";
    and an error raised here would end the page's event chain, leaving the buttons it locked for
    the run locked. Wrapped once per component, however many events it feeds."""
    for component in components:
        if not isinstance(component, (gr.Number, gr.Slider)) or getattr(component, "_usersim_checked", False):
            continue
        original, label = component.preprocess, component.label or "A number box"
        low, high = getattr(component, "minimum", None), getattr(component, "maximum", None)

        def preprocess(payload: Any, original: Callable[[Any], Any] = original, label: str = label,
                       low: float | None = low, high: float | None = high) -> Any:
            if payload is None:
                return original(payload)
            if isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload):
                return Refused(f"'{label}' must be a number; got {payload!r:.40}.")
            if (low is not None and payload < low) or (high is not None and payload > high):
                bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else \
                    (f"at least {low:g}" if low is not None else f"at most {high:g}")
                return Refused(f"'{label}' must be {bounds}; got {payload!r}.")
            return original(payload)

        component.preprocess = preprocess
        component._usersim_checked = True


def count_user_tokens(text: str) -> int:
    """Tokens as the simulated user's tokenizer counts them, so typed and model turns compare."""
    return len(simulator().tokenizer.encode(text, add_special_tokens=False))


# ---- rendering -----------------------------------------------------------------------------

SPEAKERS = {("user", "model"): "Simulated user", ("assistant", "script"): "Assistant (scripted)"}
# anything else is its role: a typed turn's badge says "typed by researcher"


def speaker(role: str, author: str = "model") -> str:
    """Who wrote a message, as its label in the chat says."""
    return SPEAKERS.get((role, author), role.capitalize())


def chat_messages(dialogue: Dialogue) -> list[dict[str, Any]]:
    """Chat bubbles, two per turn: first its header, a folded message whose title names the
    speaker and gives the badge line (its body: guardrail decisions and rejected samples), then
    the turn's text shown literally, so nothing a turn contains can break its badge, and an
    edit in the chat edits only the text."""
    messages: list[dict[str, Any]] = []
    for number, turn in enumerate(dialogue.turns, 1):
        text = literal_markdown(turn.text) if turn.text else ""
        if turn.ends_dialogue:
            text = (text + "\n\n" if text else "") + "*⟨ends the conversation: `<|endconversation|>`⟩*"
        details = [f"- **{e.guardrail}** {e.action}: {literal_markdown(e.detail)}" for e in turn.guardrails]
        details += [f"- rejected (*{literal_line(r.reason)}*): {literal_markdown(r.text) or '(empty)'}"
                    for r in turn.rejected]
        if turn.seed is not None:
            details.append(f"- seed `{turn.seed}`")
        title = f"#{number} · {speaker(turn.role, turn.author)} · {badge_line(turn)}"
        messages.append({"role": turn.role, "content": "\n".join(details) or "No guardrail acted.",
                         "metadata": {"title": title, "status": "done"}})
        messages.append({"role": turn.role, "content": text or "*(empty)*"})
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
    return START_TEXT


def render(dialogue: Dialogue, running: str | None = None, notice: str | None = None) -> tuple[Any, ...]:
    """Every view of the dialogue, in the order of the page's ``view`` outputs."""
    table = turn_table(dialogue)
    return (dialogue, chat_messages(dialogue), status_text(dialogue, running, notice), lengths_figure(dialogue, table),
            p_end_figure(dialogue, table), summary_text(dialogue, running=bool(running)), to_markdown(dialogue))


def running_text(dialogue: Dialogue, settings: transitions.RunSettings) -> str:
    role = dialogue.next_role
    number = dialogue.user_turns + 1 if role == "user" else dialogue.user_turns
    return f"Writing {role} turn {number} of {settings.max_turns}…"


def draft_messages(dialogue: Dialogue, draft: Draft) -> list[dict[str, Any]]:
    """The chat with the turn being written after it: a pending header with the guardrails'
    story so far (it becomes the turn's badge once the turn is accepted), then the text so far,
    shown literally as a finished turn's."""
    number = len(dialogue.turns) + 1
    last = draft.sample + draft.samples - 1
    if draft.samples > 1:
        text = f"*drawing samples {draft.sample}–{last} together…*"
    else:
        text = (literal_markdown(draft.text) + " ▍") if draft.text else "*…*"
    which = f"sample {draft.sample}" if draft.samples == 1 else f"samples {draft.sample}–{last}"
    title = (f"#{number} (writing) · {speaker(draft.role)} · {which}"
             + (f" · {draft.tokens} tokens" if draft.tokens else ""))
    body = "\n".join(f"- {literal_line(note)}" for note in draft.notes) or "No guardrail has acted yet."
    return chat_messages(dialogue) + [
        {"role": draft.role, "content": body, "metadata": {"title": title, "status": "pending"}},
        {"role": draft.role, "content": text},
    ]


def draft_view(dialogue: Dialogue, draft: Draft, settings: transitions.RunSettings) -> tuple[Any, ...]:
    """The views while a turn is written: the chat and the status line (the charts wait for
    the turn: drawing them costs ~0.25 s of CPU, too much to spend a dozen times a second)."""
    status = running_text(dialogue, settings)
    if draft.notes:
        status += f" {draft.notes[-1][0].upper()}{draft.notes[-1][1:]}; drawing sample {draft.sample}."
    return (gr.skip(), draft_messages(dialogue, draft), status) + tuple(gr.skip() for _ in range(N_VIEW - 3))


# ---- model runs ----------------------------------------------------------------------------

def begin(dialogue: Dialogue | None, intent: str) -> Dialogue:
    """The dialogue to continue; before its first turn it takes the intent box as it is now."""
    if dialogue is None or not dialogue.turns:
        return replace(dialogue or Dialogue(intent=""), intent=transitions.validate_intent(intent),
                       user_model=simulator().model_id)
    return dialogue


def live_settings(session: str) -> transitions.RunSettings | None:
    return RUNS.session_data(session).get("settings")  # type: ignore[return-value]


def set_live_settings(session: str, settings: transitions.RunSettings) -> None:
    RUNS.session_data(session)["settings"] = settings


def turn_maker(spec: BackendSpec, run: Run, regenerate_from: Dialogue | None, on_draft: OnDraft | None = None
               ) -> Callable[[Dialogue, transitions.RunSettings], Dialogue]:
    """One turn of a run: local-model turns through the GPU function and the model slot;
    endpoint and researcher turns straight here (no GPU slice, no slot). ``on_draft`` hears
    the turn as it is written."""
    def make(dialogue: Dialogue, settings: transitions.RunSettings) -> Dialogue:
        if run.stop.is_set():
            raise GenerationCancelled("stopped between turns")
        # None: the seed scheme's seed for this position
        seed = transitions.regeneration_seed(regenerate_from, settings) if regenerate_from is not None else None
        if not uses_local_model(dialogue, spec):
            return transitions.assistant_turn(dialogue, make_backend(spec), settings, run.stop, seed, on_draft)
        with RUNS.model_slot(run):
            return run_model_turn(dialogue, settings, spec, seed, run.stop, on_draft)
    return make


def run_turns(dialogue: Dialogue | None, intent: str, form: Form, session: str, role: str | None,
              max_new_turns: int | None, regenerate: bool = False, event: str = "run",
              visitor: str | None = None) -> Iterator[tuple[Any, ...]]:
    """Make turns and stream each into the view. Stop, End, Reset or an error keep every turn
    made so far (Regenerate keeps the original turn unless a new one was made).

    The run registers *before* it reads the dialogue: ``dialogue`` (the page's state when the
    event was queued) gives way to whatever a Send, Edit, Undo or Import committed before, so
    their confirmed work is never overwritten by the run's first update."""
    shown = dialogue
    try:
        with RUNS.start(session, visitor) as run:
            dialogue = RUNS.dialogue(session, dialogue)
            if run.stopped_early:
                yield notice_only("Stopped before the run began (Stop came as it was sent). Nothing was changed.")
                return
            settings, spec = form.settings, form.backend
            if regenerate:
                if dialogue is None or not dialogue.turns:
                    raise ValueError("Nothing to regenerate yet.")
                if shown is not None and shown.turns[-1:] != dialogue.turns[-1:]:
                    # an edit, undo or fork came first: the turn Regenerate was pressed for is gone
                    raise ValueError("The last turn changed after Regenerate was pressed; press it again to "
                                     "regenerate the turn shown now.")
                original, start = dialogue, transitions.undo(dialogue)
            else:
                original = start = begin(dialogue, intent)
            if role is not None and start.next_role != role:
                raise ValueError(f"It is the {start.next_role}'s turn.")
            if start.next_role == "assistant" and researcher_types(spec.kind):
                raise transitions.NeedsResearcher("You are the assistant: type the reply and press Send.")
            start = transitions.ensure_open(start, settings)
            yield from _run(run, original, start, settings, spec, session, max_new_turns, regenerate, shown)
    except (RunRefused, *USER_ERRORS) as exc:
        yield refuse(str(exc), event, session)


def stopped_text(run: Run) -> str:
    if run.timed_out:
        return (f"Stopped: one run may last {RUNS.max_run_s / 60:g} minutes on this server. "
                "The dialogue so far is kept; run again to go on.")
    return "Stopped. The dialogue so far is kept."


def _run(run: Run, original: Dialogue, start: Dialogue, settings: transitions.RunSettings, spec: BackendSpec,
         session: str, max_new_turns: int | None, regenerate: bool,
         shown: Dialogue | None = None) -> Iterator[tuple[Any, ...]]:
    """``shown``: the dialogue the caller shows (the page's state); when the run starts from it
    and changes nothing, its views are not drawn again."""
    set_live_settings(session, settings)
    now = lambda: live_settings(session) or settings  # noqa: E731 - toggles moved mid-run apply next turn
    current, notice = start, None
    RUNS.commit(run, original)
    # the caller has this dialogue's views already (an empty dialogue's are empty whatever its intent):
    # drawing three empty charts again would only delay the first token on the page
    unchanged = (shown is not None and shown == original) or (not original.turns and (shown is None or not shown.turns))
    if unchanged:
        yield status_only(original, running=running_text(start, settings))
    else:
        yield render(original, running=running_text(start, settings))
    drafted, regenerate_from = False, original if regenerate else None
    turns = lambda on_draft: transitions.run(start, turn_maker(spec, run, regenerate_from, on_draft), now,  # noqa: E731
                                             max_new_turns)
    try:
        for item in with_drafts(turns, run.stop):
            if isinstance(item, Draft):  # the turn being written: the chat and the status line only
                drafted = True
                yield draft_view(current, item, now())
                continue
            current = item
            if not RUNS.commit(run, current):
                raise GenerationCancelled("the session's dialogue changed under the run")
            yield render(current, running=None if current.ended_by else running_text(current, now()))
    except GenerationCancelled:
        notice = stopped_text(run)
    except (gr.Error, *USER_ERRORS) as exc:
        message = exc.message if isinstance(exc, gr.Error) else str(exc)
        log.info("run ended early (session %s): %s", session[:8], message)
        gr.Warning(message)
        notice = f"⚠ {message.rstrip('.')}. The dialogue so far is kept."
    kept = original if regenerate and current is start else current
    final = RUNS.finish(run, kept)
    if unchanged and final == original and not drafted:  # stopped or failed before any token: nothing to redraw
        yield status_only(final, notice=notice if final is kept else None)
    else:
        yield render(final, notice=notice if final is kept else None)


# ---- events that change the dialogue without a model ---------------------------------------

def guarded(event: str, session: str, dialogue: Dialogue | None, transition: Callable[[Dialogue], Dialogue],
            while_running: str, notice: Callable[[Dialogue], str | None] | None = None) -> tuple[Any, ...]:
    """Apply a quick transition to the session's latest dialogue unless a run is in flight;
    refuse otherwise. ``notice(made)``: the status line to show with the result."""
    def apply(latest: Dialogue | None) -> Dialogue:
        if latest is None:
            raise ValueError("There is no dialogue yet.")
        return transition(latest)
    try:
        made = RUNS.transition(session, dialogue, apply, while_running)
    except (RunRefused, *USER_ERRORS) as exc:
        return refuse(str(exc), event, session)
    return render(made, notice=notice(made) if notice is not None else None)


def cancel_then(event: str, session: str, dialogue: Dialogue | None, transition: Callable[[Dialogue], Dialogue],
                on_run: Callable[[Dialogue], Dialogue] | None = None) -> tuple[Any, ...]:
    """End and Reset: stop any run and make the transition its last word (``on_run``, if
    given, is what the run applies), else apply it to the session's dialogue."""
    try:
        final = RUNS.apply_after_runs(session, dialogue, transition, on_run=on_run)
        return render(final)
    except (RunRefused, *USER_ERRORS) as exc:
        return refuse(str(exc), event, session)


def end_dialogue(dialogue: Dialogue | None, session: str) -> tuple[Any, ...]:
    """End: the researcher ends the dialogue. During a run (its first turn included) it stops
    the run and ends what the run made; with no run and no turn there is nothing to end."""
    def end(latest: Dialogue | None) -> Dialogue:
        if latest is None or not latest.turns:
            raise ValueError("There is no dialogue to end yet.")
        return transitions.end_by_researcher(latest)

    def end_run(made: Dialogue) -> Dialogue:  # the run's last word: it stops either way
        return transitions.end_by_researcher(made) if made.turns else made
    return cancel_then("end_dialogue", session, dialogue, end, on_run=end_run)


def reset(dialogue: Dialogue | None, intent: str, session: str) -> tuple[Any, ...]:
    fresh = Dialogue(intent=(intent or "").strip()[:MAX_INTENT_CHARS])
    return cancel_then("reset", session, dialogue, lambda _d: fresh)


def send_reply(dialogue: Dialogue | None, intent: str, text: str, settings: transitions.RunSettings,
               session: str) -> tuple[Any, ...]:
    """The researcher's typed turn; the reply box empties only when the turn was taken."""
    try:
        made = RUNS.transition(
            session, dialogue, lambda latest: transitions.researcher_turn(begin(latest, intent), text, settings,
                                                                     count_user_tokens), "Sending a reply")
        return render(made) + ("",)
    except (RunRefused, *USER_ERRORS) as exc:
        return refuse(str(exc), "send_reply", session) + (gr.skip(),)


def export_file(dialogue: Dialogue | None, session: str) -> str:
    """The session's dialogue as a JSONL file in the session's own folder (replaced on each
    export, removed when the session ends)."""
    dialogue = RUNS.dialogue(session, dialogue)
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


KEEP_SHOWN = -1  # what the page sends for an example when the researcher keeps the dialogue shown


def load_example_at(examples: Sequence[Any], index: Any, session: str) -> tuple[Any, ...]:
    """The gallery's ``index``-th example (API callers send the index): a clear refusal for
    one that does not exist. ``KEEP_SHOWN`` (the page's confirm was answered No): nothing changes."""
    if index == KEEP_SHOWN:
        return notice_only("Kept the dialogue shown; the example was not loaded.") + (gr.skip(),)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(examples):
        message = (f"There is no example {index!r:.40}: the gallery holds {len(examples)}, numbered 0 to "
                   f"{len(examples) - 1}." if examples else "The gallery holds no examples.")
        return refuse(message, "load_example", session) + (gr.skip(),)
    return load_example(examples[index].path, session)


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
        try:
            dialogues = dialogues_from_jsonl(text, max_text_chars=MAX_TURN_CHARS, max_turns=MAX_TURNS,
                                             max_dialogues=MAX_IMPORT_DIALOGUES)
        except RecursionError as exc:  # json's parser recurses once per level of nesting
            raise ValueError("the file nests JSON arrays or objects too deeply to be a dialogue record") from exc
        if not dialogues:
            raise ValueError("The file holds no dialogue.")
        for number, imported in enumerate(dialogues, 1):
            try:
                transitions.validate_intent(imported.intent)
            except ValueError as exc:
                raise ValueError(f"dialogue {number}: {exc}") from exc
        shown = RUNS.transition(session, None, lambda _latest: dialogues[0], "Importing")
    except (RunRefused, ValueError, OSError) as exc:
        return refuse(f"Could not import: {exc}", "import_jsonl", session) + (gr.skip(),)
    if len(dialogues) > 1:
        gr.Info(f"The file holds {len(dialogues)} dialogues; showing the first.")
    return render(shown) + (shown.intent,)
