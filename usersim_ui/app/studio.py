"""The Gradio page: lays out components and wires each event to a handler in ``handlers``.

Data flows one way: event -> handler -> core transition (``core.transitions``) -> new
``Dialogue`` in ``gr.State`` -> ``handlers.render``. Overlapping events follow ``run_control``'s design; an event
that cannot apply is a toast, and every output stays as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import gradio as gr

from usersim_ui.analysis.charts import guardrail_figure
from usersim_ui.app import branches, handlers
from usersim_ui.app.batch_tab import build_batch_tab
from usersim_ui.app.branches import FORK_DEFAULT, FORK_MAX
from usersim_ui.app.examples import load_examples
from usersim_ui.app.form import (
    BACKEND_FIELDS,
    Form,
    guardrail_boxes,
    number_input,
    settings_from_inputs,
)
from usersim_ui.app.mcp_tool import register as register_user_turn_tool
from usersim_ui.app.style import STUDIO_CSS
from usersim_ui.app.zerogpu import simulator
from usersim_ui.assistants.registry import (
    PAGE_CHOICES,
    needs_endpoint,
    researcher_types,
    takes_model,
)
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import Dialogue
from usersim_ui.core.guardrails import GUARDRAILS
from usersim_ui.core.intents import load_sample_intents
from usersim_ui.core.limits import MAX_INTENT_CHARS, MAX_TURN_CHARS

__all__ = ["build_app", "simulator"]


def model_info() -> str:
    sim = simulator()
    note = (" — a *prompted baseline*, not UserLM: UserLM-8b needs a GPU" if sim.is_prompted_baseline else "")
    return f"**Simulated user:** `{sim.model_id}` on **{sim.device}**{note}"


@dataclass
class Page:
    """The components the events are wired to."""

    state: Any
    intent: Any
    settings: list[Any]  # settings_from_inputs' positional arguments (the API's order)
    backend: list[Any]
    extra: list[Any]  # settings added later, passed after the backend so API callers keep their order
    view: list[Any]
    buttons: dict[str, Any]
    your_reply: Any
    edit_no: Any
    edit_text: Any
    export_file: Any
    import_file: Any
    openai_box: Any
    you_box: Any
    info: Any
    chatbot: Any
    gallery: Any
    examples: list[Any]
    intents: list[Any]  # the sample intents, offered by the empty chat
    fork: Any  # ForkPanel


# ---- layout --------------------------------------------------------------------------------

def _gallery() -> tuple[Any, list[Any]]:
    """Finished example dialogues, one click to load (each label says which model made it)."""
    examples = load_examples()
    if not examples:
        return None, []
    with gr.Accordion("Example dialogues", open=False):
        ds = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[[e.label] for e in examples],
                        type="index", label="Load a finished dialogue", elem_id="gallery")
    return ds, examples


def _intent_panel() -> Any:
    return gr.Textbox(label="Task intent", lines=2, max_length=MAX_INTENT_CHARS, elem_id="intent",
                      placeholder="What the simulated user wants, e.g. 'You want to ...', or click a sample intent "
                                  "in the dialogue box")


ELEM_IDS = {"first_token": "g-first", "no_early_ending": "g-end", "length": "g-length", "repetition": "g-repeat"}


def _guardrail_settings(name: str) -> tuple[list[Any], list[Any]]:
    """The boxes beside a guardrail's switch: (settings in the API order, extras sent last), at
    the paper's values (``form.guardrail_boxes``)."""
    first = guardrail_boxes()
    if name == "first_token":
        return [], [gr.Textbox(first["banned_words"], label="Banned first words", elem_id="g-first-words",
                               max_length=2000),
                    gr.Checkbox(first["any_case"], label="Any case", elem_id="g-first-case", info="also 'i', 'YOU'...")]
    if name == "no_early_ending":
        return [gr.Number(first["min_turns_before_end"], label="Min user turns before ending (0 = never)",
                          precision=0, minimum=0)], []
    if name == "length":
        return [gr.Number(first["min_words"], label="Min words", precision=0, minimum=0),
                gr.Number(first["max_words"], label="Max words", precision=0, minimum=1)], []
    if name == "repetition":
        return [gr.Number(first["retry_cap"], label="Retry cap", precision=0, minimum=0, maximum=32)], []
    return [], []


def _guardrail_panel() -> tuple[list[Any], list[Any]]:
    """One row per guardrail of the core's table: its switch, then its settings."""
    settings: list[Any] = []
    extras: list[Any] = []
    gr.Markdown("### Guardrails\nThey apply to the next turn, even during an auto-run.", elem_classes="side-head")
    for g in GUARDRAILS:
        with gr.Group():
            switch = gr.Checkbox(g.default, label=g.toggle, elem_id=ELEM_IDS.get(g.name, f"g-{g.name}"), info=g.help)
            with gr.Row():
                boxes, extra = _guardrail_settings(g.name)
        settings += [switch, *boxes]
        extras += extra
    return settings, extras


def _sampling_panel(max_new_tokens: int, max_turns: int) -> list[Any]:
    turn_cap = gr.Slider(1, 30, max_turns, step=1, label="Max user turns (turn cap)", elem_id="turn-cap")
    with gr.Accordion("Simulated user sampling", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, 1.0, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, 0.8, step=0.05, label="Top-p")
        with gr.Row():
            new_tokens = gr.Slider(8, 256, max_new_tokens, step=8, label="Max new tokens")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0)
    return [temperature, top_p, new_tokens, seed, turn_cap]


def _assistant_panel(assistant_max_tokens: int) -> tuple[list[Any], Any]:
    with gr.Accordion("Assistant", open=True):
        kind = gr.Radio(PAGE_CHOICES, value="local", label="Assistant backend", elem_id="backend")
        system_prompt = gr.Textbox("You are a helpful assistant.", label="Assistant system prompt", lines=2,
                                   max_length=MAX_TURN_CHARS)
        with gr.Row():
            temperature = gr.Slider(0, 2, 0.7, step=0.05, label="Assistant temperature")
            max_tokens = gr.Slider(8, 1024, assistant_max_tokens, step=8, label="Assistant max tokens")
        model_name = gr.Textbox(label="Assistant model", elem_id="assistant-model",
                                placeholder="local: empty for the offline SmolLM2, or a model the host allows; "
                                            "endpoint: served model name")
        with gr.Group(visible=False) as openai_box:
            base_url = gr.Textbox(label="Base URL", placeholder="http://localhost:8000/v1")
            api_key = gr.Textbox(label="API key (kept in this browser session, never exported)", type="password")
    return [kind, system_prompt, temperature, max_tokens, base_url, model_name, api_key], openai_box


def _dialogue_panel(intents: list[Any]) -> tuple[Any, Any, dict[str, Any], Any, Any, Any, Any, Any]:
    """The chat (an empty one offers the sample intents: one click starts a dialogue), the
    status line, the run controls, the researcher's reply box, the fork and the edit form."""
    chatbot = gr.Chatbot(label="Dialogue", height=400, elem_id="dialogue", buttons=["copy"], sanitize_html=True,
                         editable="all", examples=[{"text": i.title} for i in intents],
                         placeholder="**Pick a sample intent** (one click starts a dialogue), or write your own "
                                     "intent above and press **Step**.")
    banner = gr.Markdown(handlers.START_TEXT, elem_id="banner")
    buttons: dict[str, Any] = {}
    with gr.Row(elem_id="run-controls"):
        buttons["step"] = gr.Button("Step", variant="primary", min_width=90)
        buttons["auto_run"] = gr.Button("Auto-run", variant="primary", min_width=90)
        buttons["stop"] = gr.Button("Stop", variant="secondary", interactive=False, elem_id="stop", min_width=90)
    with gr.Row(elem_id="turn-controls"):
        buttons["next_user_turn"] = gr.Button("Next user turn", size="sm", min_width=90)
        buttons["next_assistant_turn"] = gr.Button("Next assistant turn", size="sm", min_width=90)
        buttons["undo"] = gr.Button("Undo last turn", size="sm", min_width=90)
        buttons["regenerate"] = gr.Button("Regenerate last turn", size="sm", min_width=90)
        buttons["end_dialogue"] = gr.Button("End dialogue", size="sm", min_width=90)
        buttons["reset"] = gr.Button("Reset", size="sm", min_width=90)
        buttons["fork"] = gr.Button("What else could the user say here?", size="sm", elem_id="fork", min_width=90)
    with gr.Row(visible=False) as you_box:
        your_reply = gr.Textbox(label="Your reply as the assistant", scale=4, elem_id="your-reply",
                                max_length=MAX_TURN_CHARS)
        buttons["send_reply"] = gr.Button("Send", scale=1)
    fork = _fork_panel(buttons)
    with gr.Accordion("Edit a turn by number (or edit its text in the chat)", open=False):
        with gr.Row():
            edit_no = gr.Number(1, label="Turn #", precision=0, minimum=1, scale=1)
            edit_text = gr.Textbox(label="New text", scale=4, max_length=MAX_TURN_CHARS)
            buttons["edit_turn"] = gr.Button("Apply edit and continue from it", scale=1)
    return chatbot, banner, buttons, you_box, your_reply, edit_no, edit_text, fork


@dataclass
class ForkPanel:
    box: Any
    at: Any
    n: Any
    choices: Any


def _fork_panel(buttons: dict[str, Any]) -> ForkPanel:
    """A fork: N next user turns from the same prefix, side by side, each with its P(end) and
    what the guardrails did; the researcher continues from any of them."""
    with gr.Accordion("What else could the user say here?", open=False, elem_id="fork-box") as box:
        with gr.Row():
            at = gr.Number(0, label="At turn # (0: the next user turn, else the last)", precision=0,
                           minimum=0, elem_id="fork-at")
            n = gr.Slider(2, FORK_MAX, FORK_DEFAULT, step=1, label="Alternatives (one batched call)", elem_id="fork-n")
        choices = gr.Radio([], label="Alternatives: text · P(end) · guardrails", elem_id="fork-choices")
        buttons["continue_fork"] = gr.Button("Continue from this one", elem_id="continue-fork")
    return ForkPanel(box, at, n, choices)


def _charts_panel(state: Any) -> tuple[Any, Any, Any]:
    p_end_plot = gr.Plot(label="P(end)", show_label=False, elem_id="pend-plot")
    summary_md = gr.Markdown(elem_id="summary")
    guard_plot = gr.Plot(label="Guardrails", show_label=False, elem_id="guardrail-plot")
    lengths_plot = gr.Plot(label="Turn lengths", show_label=False, elem_id="lengths-plot")
    # derived from the state, so that the API's outputs stay as they were
    state.change(lambda d: guardrail_figure(d or Dialogue(intent="")), [state], [guard_plot], api_name=False,
                 queue=False)
    return summary_md, lengths_plot, p_end_plot


def _export_panel() -> tuple[Any, Any, Any]:
    with gr.Accordion("Export / import", open=False):
        export_button = gr.Button("Export JSONL")
        export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
        import_file = gr.File(label="Import JSONL", file_types=[".jsonl", ".json"], elem_id="import-file")
    return export_button, export_file, import_file


def _transcript_panel() -> Any:
    with gr.Accordion("Transcript", open=False):
        transcript_view = gr.Markdown(elem_id="transcript-view")
        with gr.Accordion("Raw Markdown", open=False):
            # not editable: the view above renders it, so it must be what the handlers wrote (escaped)
            transcript = gr.Textbox(label="Transcript (Markdown)", lines=6, buttons=["copy"], elem_id="transcript",
                                    interactive=False)
    transcript.change(lambda text: text, [transcript], [transcript_view], api_name=False, queue=False)
    return transcript


def _layout(max_new_tokens: int, assistant_max_tokens: int, max_turns: int) -> Page:
    """The story on one screen: at 1440x900 the intent, the dialogue, the run controls and the
    P(end) chart are visible together; the settings live in a sidebar (collapsed on a phone,
    where the intent, the dialogue and the controls come first, the charts after)."""
    state = gr.State(None)
    with gr.Sidebar(label="Settings", open=True, width=340, elem_id="settings"):
        guardrails, extra = _guardrail_panel()
        sampling = _sampling_panel(max_new_tokens, max_turns)
        backend, openai_box = _assistant_panel(assistant_max_tokens)
        gallery, examples = _gallery()
        buttons_export, export_file, import_file = _export_panel()
    info = gr.Markdown(model_info(), elem_id="model-info")
    with gr.Row(equal_height=False, elem_id="story"):
        with gr.Column(scale=3, min_width=360, elem_id="main-column"):
            intent = _intent_panel()
            intents = load_sample_intents()
            chatbot, banner, buttons, you_box, your_reply, edit_no, edit_text, fork = _dialogue_panel(intents)
        with gr.Column(scale=2, min_width=320, elem_id="chart-column"):
            summary_md, lengths_plot, p_end_plot = _charts_panel(state)
    transcript = _transcript_panel()
    buttons["export_jsonl"] = buttons_export
    for name, on in control_states(None, "local", max_turns, busy=False, intent="").items():
        buttons[name].interactive = on  # right from the first paint, before any event has run
    temperature, top_p, new_tokens, seed, turn_cap = sampling
    settings = [temperature, top_p, new_tokens, seed, turn_cap, *guardrails]
    view = [state, chatbot, banner, lengths_plot, p_end_plot, summary_md, transcript]
    return Page(state, intent, settings, backend, extra, view, buttons, your_reply, edit_no, edit_text, export_file,
                import_file, openai_box, you_box, info, chatbot, gallery, examples, intents, fork)


# ---- controls ------------------------------------------------------------------------------

def control_states(dialogue: Dialogue | None, kind: str, max_turns: float | None, busy: bool,
                   intent: str | None = None) -> dict[str, bool]:
    """Which buttons can act now: none but Stop, End and Reset while a run is in flight; nothing
    that makes a turn before there is an intent (``intent``: the box; None: not known, allowed)."""
    dialogue = dialogue or Dialogue(intent="")
    has_turns = bool(dialogue.turns)
    no_intent = not has_turns and intent is not None and not intent.strip()
    try:
        open_ = not transitions.ensure_open(dialogue, transitions.RunSettings(max_turns=int(max_turns or 1))).ended_by
    except transitions.DialogueOver:
        open_ = False
    user_next = dialogue.next_role == "user"
    you = researcher_types(kind)
    states = {
        "next_user_turn": open_ and user_next, "next_assistant_turn": open_ and not user_next and not you,
        "step": open_ and (user_next or not you), "auto_run": open_ and (user_next or not you),
        "send_reply": open_ and you, "undo": has_turns, "regenerate": has_turns, "edit_turn": has_turns,
        "end_dialogue": has_turns and not dialogue.ended_by, "reset": True, "export_jsonl": has_turns,
        "stop": False, "fork": not no_intent, "continue_fork": not no_intent,
    }
    if no_intent:
        states.update(next_user_turn=False, step=False, auto_run=False)
    if busy:
        states = {name: name in ("stop", "end_dialogue", "reset", "export_jsonl") for name in states}
    return states


def _controls(page: Page) -> Any:
    names = list(page.buttons)

    def updates(dialogue: Dialogue | None, kind: str, max_turns: float | None, busy: bool,
                intent: str | None = None) -> list[Any]:
        states = control_states(dialogue, kind, max_turns, busy, intent)
        return [gr.update(interactive=states[n], variant="stop" if busy else "secondary") if n == "stop"
                else gr.update(interactive=states[n]) for n in names]

    def update(dialogue: Dialogue | None, kind: str, max_turns: float | None, intent: str | None,
               request: gr.Request) -> list[Any]:
        return updates(dialogue, kind, max_turns, handlers.RUNS.in_flight(handlers.session_of(request)), intent)

    def lock() -> list[Any]:  # on click, before the run has registered: already as during a run
        return updates(None, "local", None, busy=True)

    outputs = [page.buttons[n] for n in names]
    refresh_inputs = [page.state, page.backend[0], page.settings[4], page.intent]
    return update, lock, outputs, refresh_inputs


# ---- wiring --------------------------------------------------------------------------------

def _wire_runs(page: Page, update: Any, lock: Any, outputs: list[Any], refresh_inputs: list[Any]) -> None:
    n_set, n_back = len(page.settings), len(page.backend)
    inputs = [page.state, page.intent, *page.settings, *page.backend, *page.extra]
    handlers.checked_numbers(inputs)  # "abc" in a number box: a refusal naming the box, not gradio's TypeError

    def handler(role: str | None, max_new: int | None, regenerate: bool, event: str):
        def run(request: gr.Request, dialogue, intent_text, *values):
            session = handlers.session_of(request)
            try:
                form = Form.parse(values[:n_set], values[n_set:n_set + n_back], values[n_set + n_back:])
            except ValueError as exc:
                yield handlers.refuse(str(exc), event, session)
                return
            yield from handlers.run_turns(dialogue, intent_text, form, session, role, max_new, regenerate, event,
                                        visitor=handlers.visitor_of(request))
        return run

    def clicked(request: gr.Request) -> list[Any]:
        # A new click supersedes a Stop that found no run; a Stop pressed from here on reaches
        # this run even before it registers (run_control remembers it).
        handlers.RUNS.clear_stop(handlers.session_of(request))
        return lock()

    runs = {"next_user_turn": ("user", 1, False), "next_assistant_turn": ("assistant", 1, False),
            "step": (None, 2, False), "auto_run": (None, None, False), "regenerate": (None, 1, True)}
    for name, (role, max_new, regenerate) in runs.items():
        # Runs register with run_control the moment they start: no gradio queue in front of them
        # (so Stop reaches a waiting run), bounded by RunControl.max_runs instead.
        page.buttons[name].click(clicked, None, outputs, queue=False, api_name=False).then(
            handler(role, max_new, regenerate, name), inputs, page.view, api_name=name,
            concurrency_id="runs", concurrency_limit=handlers.RUNS.max_runs + 4,
        ).then(update, refresh_inputs, outputs, queue=False, api_name=False)

    def pick_sample(picked: gr.SelectData, request: gr.Request) -> list[Any]:
        """The sample's intent into the box (the event's data reaches only this first step)."""
        return [*clicked(request), page.intents[int(picked.index)].intent]

    def start_sample(request: gr.Request, dialogue, intent_text, *values):
        """One click on a sample intent: on an empty dialogue it makes the first exchange; a
        dialogue with turns is kept (its intent is fixed): Reset starts one with the new intent."""
        latest = handlers.RUNS.dialogue(handlers.session_of(request), dialogue)
        if latest is not None and latest.turns:
            yield handlers.notice_only("Intent set. Press **Reset** to start a new dialogue with it; the dialogue "
                                     "shown stays until then.")
            return
        yield from handler(None, 2, False, "sample_intent")(request, dialogue, intent_text, *values)

    page.chatbot.example_select(pick_sample, None, outputs + [page.intent], queue=False, api_name=False).then(
        start_sample, inputs, page.view, api_name=False,
        concurrency_id="runs", concurrency_limit=handlers.RUNS.max_runs + 4,
    ).then(update, refresh_inputs, outputs, queue=False, api_name=False)

    def draw_fork(request: gr.Request, dialogue, intent_text, at, n, *values):
        session = handlers.session_of(request)
        try:
            form = Form.parse(values[:n_set], values[n_set:n_set + n_back], values[n_set + n_back:])
        except ValueError as exc:
            handlers.refuse(str(exc), "fork", session)
            yield gr.skip(), gr.skip()
            return
        yield from branches.draw_fork(dialogue, intent_text, at, n, form.settings, session,
                                      handlers.visitor_of(request))

    fork = page.fork
    handlers.checked_numbers([fork.at, fork.n])
    page.buttons["fork"].click(lambda: [*lock(), gr.update(open=True)], None, outputs + [fork.box], queue=False,
                               api_name=False).then(
        draw_fork, [page.state, page.intent, fork.at, fork.n, *inputs[2:]], [fork.choices, page.view[2]],
        api_name="fork", concurrency_id="runs", concurrency_limit=handlers.RUNS.max_runs + 4,
    ).then(update, refresh_inputs, outputs, queue=False, api_name=False)

    def continue_fork(request: gr.Request, dialogue, choice):
        return branches.continue_fork(dialogue, choice, handlers.session_of(request))
    page.buttons["continue_fork"].click(continue_fork, [page.state, fork.choices], page.view, api_name="continue_fork")

    def stop(request: gr.Request) -> None:
        handlers.RUNS.stop(handlers.session_of(request))
    page.buttons["stop"].click(stop, None, None, api_name="stop", queue=False)


def _wire_edits(page: Page) -> None:
    handlers.checked_numbers([page.edit_no])

    def undo(request: gr.Request, dialogue):
        return branches.undo(dialogue, handlers.session_of(request))
    page.buttons["undo"].click(undo, [page.state], page.view, api_name="undo")

    def edit(request: gr.Request, dialogue, number, text):
        session = handlers.session_of(request)
        try:
            number = int(number_input(number, "Turn #", 1, 10**6))
        except ValueError as exc:
            return handlers.refuse(str(exc), "edit_turn", session)
        return branches.edit_and_continue(dialogue, number, text or "", session, handlers.count_user_tokens)
    page.buttons["edit_turn"].click(edit, [page.state, page.edit_no, page.edit_text], page.view, api_name="edit_turn")

    def edit_in_chat(request: gr.Request, dialogue, data: gr.EditData):
        return branches.edit_in_chat(dialogue, data.index if isinstance(data.index, int) else data.index[0],
                                     str(data.value), handlers.session_of(request), handlers.count_user_tokens)
    page.chatbot.edit(edit_in_chat, [page.state], page.view, api_name=False)

    def end(request: gr.Request, dialogue):
        return handlers.end_dialogue(dialogue, handlers.session_of(request))
    page.buttons["end_dialogue"].click(end, [page.state], page.view, api_name="end_dialogue", concurrency_limit=None)

    def reset(request: gr.Request, dialogue, intent_text):
        return handlers.reset(dialogue, intent_text, handlers.session_of(request))
    page.buttons["reset"].click(reset, [page.state, page.intent], page.view, api_name="reset", concurrency_limit=None)
    page.chatbot.clear(reset, [page.state, page.intent], page.view, api_name=False, concurrency_limit=None)

    def send(request: gr.Request, dialogue, intent_text, text, *values):
        session = handlers.session_of(request)
        try:
            settings = settings_from_inputs(*values)
        except ValueError as exc:
            return handlers.refuse(str(exc), "send_reply", session) + (gr.skip(),)
        return handlers.send_reply(dialogue, intent_text, text, settings, session)
    send_inputs = [page.state, page.intent, page.your_reply, *page.settings, *page.extra]
    page.buttons["send_reply"].click(send, send_inputs, page.view + [page.your_reply], api_name="send_reply")
    page.your_reply.submit(send, send_inputs, page.view + [page.your_reply], api_name=False)


def _wire_files(page: Page) -> None:
    def export(request: gr.Request, dialogue):
        return handlers.export_file(dialogue, handlers.session_of(request))
    page.buttons["export_jsonl"].click(export, [page.state], [page.export_file], api_name="export_jsonl")

    def load(request: gr.Request, file):
        return handlers.import_file(file, handlers.session_of(request))
    page.import_file.upload(load, [page.import_file], page.view + [page.intent], api_name="import_jsonl")

    if page.gallery is not None:
        def load_example(request: gr.Request, index: int):
            return handlers.load_example_at(page.examples, index, handlers.session_of(request))
        page.gallery.click(load_example, [page.gallery], page.view + [page.intent], api_name="load_example",
                           js=CONFIRM_REPLACE)


def _wire_settings(page: Page) -> None:
    def update_live(request: gr.Request, *values):
        try:
            handlers.set_live_settings(handlers.session_of(request), settings_from_inputs(*values))
        except ValueError as exc:
            gr.Warning(str(exc))
    live_inputs = page.settings + page.extra
    gr.on([c.change for c in live_inputs], update_live, live_inputs, None, api_name="update_settings",
          concurrency_limit=None)

    def show_backend(kind):  # the boxes each kind reads (the table says which), and the reply box
        return (gr.update(visible=needs_endpoint(kind)), gr.update(visible=takes_model(kind)),
                gr.update(visible=researcher_types(kind)))
    page.backend[0].change(show_backend, [page.backend[0]], [page.openai_box, page.backend[BACKEND_FIELDS.index("model")], page.you_box],
                           api_name=False)


# Loading an example replaces the dialogue shown: the page asks first when there is one.
CONFIRM_REPLACE = f"""(index) => {{
  const shown = document.querySelector('#dialogue .message-row');
  return (!shown || confirm('Replace the dialogue shown with this example? Export it first to keep it.'))
    ? index : {handlers.KEEP_SHOWN};
}}"""

# On a phone the settings sidebar would cover the page: it starts closed there (its toggle opens it).
CLOSE_SIDEBAR_ON_PHONE = """() => {
  const side = document.querySelector('#settings');
  if (window.innerWidth < 769 && side && side.classList.contains('open')) side.querySelector('.toggle-button').click();
}"""


def build_app(max_new_tokens: int = 64, assistant_max_tokens: int = 256, max_turns: int = 6) -> gr.Blocks:
    """The page; the arguments set the initial slider values (short user turns keep a CPU demo brisk)."""
    # Exported files and uploads in gradio's cache are deleted an hour after they were made.
    handlers.configure_logging()  # refusals and failed runs are printed where the host sees them
    with warnings.catch_warnings():
        # Gradio 6 takes css at launch(); given here it is still used by any launch() that passes
        # none (tests, the soak), so every launch of this page looks the same. app.py passes it too.
        warnings.simplefilter("ignore", UserWarning)
        demo = gr.Blocks(title="UserSim Studio", delete_cache=(600, 3600), css=STUDIO_CSS)
    with demo:
        with gr.Tab("Studio"):
            page = _layout(max_new_tokens, assistant_max_tokens, max_turns)
        with gr.Tab("Batch runs"):
            build_batch_tab()
        update, lock, outputs, refresh_inputs = _controls(page)
        _wire_runs(page, update, lock, outputs, refresh_inputs)
        _wire_edits(page)
        _wire_files(page)
        _wire_settings(page)
        for trigger in (page.state.change, page.backend[0].change, page.settings[4].change, page.intent.change):
            trigger(update, refresh_inputs, outputs, queue=False, api_name=False)
        demo.load(lambda: model_info(), None, [page.info], api_name=False)
        demo.load(None, None, None, js=CLOSE_SIDEBAR_ON_PHONE)
        register_user_turn_tool()  # /simulated_user_turn: an API endpoint, an MCP tool with USERSIM_MCP=1

        def release(request: gr.Request) -> None:
            handlers.RUNS.forget(handlers.session_of(request))
        demo.unload(release)
    return demo
