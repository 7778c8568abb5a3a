"""The Gradio page: lays out components and wires each event to one core function.

Data flows one way: event -> core function (``engine``) -> new ``Dialogue`` in ``gr.State``
-> :func:`render`. Nothing here computes a turn; a failed event raises ``gr.Error`` before
any output changes, so the dialogue shown is the dialogue kept.
"""

import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import spaces

from . import engine
from .backends import BackendError
from .charts import lengths_figure, p_end_figure
from .defaults import BackendSpec, default_simulator, make_backend
from .dialogue import Dialogue, GuardrailSettings, SamplingSettings, dialogues_from_jsonl, dialogues_to_jsonl
from .generation import GenerationCancelled
from .intents import load_sample_intents
from .metrics import summary, turn_table
from .simulator import ContextTooLong, UserSimulator
from .transcript import badge_line, end_line, to_markdown

USER_ERRORS = (ValueError, BackendError, engine.DialogueOver, engine.NeedsResearcher, ContextTooLong, RuntimeError)
BACKEND_CHOICES = [("Local model (SmolLM2-135M-Instruct)", "local"), ("OpenAI-compatible endpoint", "openai"),
                   ("You are the assistant (type the replies)", "researcher")]

_simulator: UserSimulator | None = None
_stops: dict[str, threading.Event] = {}  # per browser session: Stop sets it, generate() checks it
_live: dict[str, engine.RunSettings] = {}  # per browser session: the settings as the toggles stand now


def simulator() -> UserSimulator:
    global _simulator
    if _simulator is None:
        _simulator = default_simulator()
    return _simulator


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _stop_event(session: str) -> threading.Event:
    return _stops.setdefault(session, threading.Event())


# ---- settings from components ------------------------------------------------------------------

def settings_from_inputs(temperature: float, top_p: float, max_new_tokens: float, seed: float, max_turns: float,
                         first_token: bool, no_early_end: bool, min_turns_before_end: float, length: bool,
                         min_words: float, max_words: float, repetition: bool, retry_cap: float) -> engine.RunSettings:
    """The run settings as the panel shows them; 0 minimum turns before ending means 'never end'."""
    if min_words > max_words:
        raise ValueError(f"Minimum words ({min_words:g}) is above maximum words ({max_words:g}).")
    guardrails = GuardrailSettings(
        first_token_filter=bool(first_token), no_early_ending=bool(no_early_end),
        min_user_turns_before_end=int(min_turns_before_end) or None, length_thresholds=bool(length),
        min_words=int(min_words), max_words=int(max_words), verbatim_repetition=bool(repetition),
        retry_cap=int(retry_cap),
    )
    sampling = SamplingSettings(temperature=float(temperature), top_p=float(top_p),
                                max_new_tokens=int(max_new_tokens), seed=int(seed))
    return engine.RunSettings(guardrails=guardrails, sampling=sampling, max_turns=int(max_turns))


def backend_from_inputs(kind: str, system_prompt: str, temperature: float, max_tokens: float, base_url: str,
                        model: str, api_key: str, seed: float = 0) -> BackendSpec:
    return BackendSpec(kind=kind, system_prompt=system_prompt, temperature=float(temperature),
                       max_tokens=int(max_tokens), base_url=base_url or "", model=model or "", api_key=api_key or "",
                       seed=int(seed))


# ---- rendering -----------------------------------------------------------------------------------

def chat_messages(dialogue: Dialogue) -> list[dict[str, Any]]:
    """Chatbot messages: each turn, its badge line, and its rejected samples folded away."""
    messages: list[dict[str, Any]] = []
    for number, turn in enumerate(dialogue.turns, 1):
        text = "*⟨ends the conversation: `<|endconversation|>`⟩*" if turn.ends_dialogue else turn.text
        messages.append({"role": turn.role, "content": f"{text}\n\n<sub>#{number} · {badge_line(turn)}</sub>"})
        if turn.rejected:
            body = "\n\n".join(f"- *{r.reason}*: {r.text or '(empty)'}" for r in turn.rejected)
            messages.append({"role": turn.role, "content": body,
                             "metadata": {"title": f"Rejected samples ({len(turn.rejected)})", "status": "done"}})
    return messages


def summary_markdown(dialogue: Dialogue) -> str:
    s = summary(dialogue)
    acts = ", ".join(f"{k} {v}" for k, v in s["guardrail_activations"].items()) or "none"
    return (f"**Turns** {s['turns']} ({s['user_turns']} user) · **Ended by** {s['ended_by']} · "
            f"**Guardrail activations** {acts} · **Mean resamples / user turn** {s['mean_resamples_per_user_turn']:.2f}"
            + (f" · **Context trims** {s['context_trims']}" if s["context_trims"] else ""))


def render(dialogue: Dialogue) -> tuple[Any, ...]:
    """Every view of the dialogue, in the order of ``view_outputs``."""
    table = turn_table(dialogue)
    banner = end_line(dialogue) or (f"Next: **{dialogue.next_role}** turn" if dialogue.turns else "Press **Step** or **Auto-run** to start.")
    return (dialogue, chat_messages(dialogue), banner, lengths_figure(dialogue, table), p_end_figure(dialogue, table),
            summary_markdown(dialogue), to_markdown(dialogue))


def model_info() -> str:
    sim = simulator()
    note = (" — a *prompted baseline*, not UserLM: UserLM-8b needs a GPU" if sim.is_prompted_baseline else "")
    return f"**Simulated user:** `{sim.model_id}` on **{sim.device}**{note}"


# ---- model work (one GPU slice per turn on ZeroGPU; a no-op decorator elsewhere) -----------------

@spaces.GPU(duration=120)
def model_turn(dialogue: Dialogue, settings: engine.RunSettings, spec: BackendSpec, session: str,
               role: str | None = None) -> Dialogue:
    """One model-made turn. Takes and returns plain data so that ZeroGPU can pickle it."""
    stop = _stop_event(session)
    if role == "user" or (role is None and dialogue.next_role == "user"):
        return engine.user_turn(dialogue, simulator(), settings, stop)
    return engine.assistant_turn(dialogue, make_backend(spec), settings, stop)


def _begin(dialogue: Dialogue | None, intent: str) -> Dialogue:
    """The dialogue to continue; before its first turn it takes the intent box as it is now."""
    if dialogue is None or not dialogue.turns:
        return replace(dialogue or Dialogue(intent=""), intent=engine.validate_intent(intent),
                       user_model=simulator().model_id)
    return dialogue


def _generate(dialogue: Dialogue | None, intent: str, settings_values: list[Any], backend_values: list[Any],
              request: gr.Request | None, role: str | None, max_new_turns: int | None,
              reseed_from: Dialogue | None = None) -> Iterator[tuple[Any, ...]]:
    """Make turns and stream each into the view; Stop or an error keeps every turn made so far.

    ``reseed_from``: regenerating the last turn of this dialogue, so the seed moves on.
    """
    session = _session(request)
    try:
        settings = settings_from_inputs(*settings_values)
        if reseed_from is not None:
            settings = engine.regeneration_settings(reseed_from, settings)
        spec = backend_from_inputs(*backend_values, seed=settings.sampling.seed)
        dialogue = _begin(dialogue, intent)
        if role is not None and dialogue.next_role != role and not dialogue.ended_by:
            raise ValueError(f"It is the {dialogue.next_role}'s turn.")
        engine.ensure_open(dialogue, settings)
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from exc
    _live[session] = settings
    stop = _stop_event(session)
    stop.clear()
    make_turn = lambda d, s: model_turn(d, s, spec, session, role)  # noqa: E731
    settings_now = lambda: _live.get(session, settings)  # noqa: E731 - toggles moved mid-run apply next turn
    try:
        for dialogue in engine.run(dialogue, make_turn, settings_now, max_new_turns):
            yield render(dialogue)
    except GenerationCancelled:
        gr.Warning("Stopped. The dialogue so far is kept.")
        yield render(dialogue)
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from exc


def _guarded(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from exc


# ---- layout --------------------------------------------------------------------------------------

def build_app(max_new_tokens: int = 64, assistant_max_tokens: int = 96, max_turns: int = 6) -> gr.Blocks:
    """The page; the arguments set the initial slider values (short turns keep a CPU demo brisk)."""
    intents = load_sample_intents()
    categories = sorted({i.category for i in intents})
    with gr.Blocks(title="UserSim Studio") as demo:
        state = gr.State(None)
        gr.Markdown("# UserSim Studio\nWatch, steer and measure dialogues between a simulated user and an assistant.")
        info = gr.Markdown(model_info(), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                intent = gr.Textbox(label="Task intent", lines=4, max_length=engine.MAX_INTENT_CHARS,
                                    placeholder="What the simulated user wants, e.g. 'You want to ...'", elem_id="intent")
                with gr.Accordion("Sample intents", open=True):
                    intent_sets = []
                    for category in categories:
                        members = [i for i in intents if i.category == category]
                        ds = gr.Dataset(components=[gr.Textbox(visible=False)], samples=[[i.title] for i in members],
                                        label=category, type="index", samples_per_page=10)
                        intent_sets.append((ds, members))
                with gr.Accordion("Assistant", open=True):
                    backend_kind = gr.Radio(BACKEND_CHOICES, value="local", label="Assistant backend", elem_id="backend")
                    system_prompt = gr.Textbox("You are a helpful assistant.", label="Assistant system prompt", lines=2)
                    with gr.Row():
                        a_temperature = gr.Slider(0, 2, 0.7, step=0.05, label="Assistant temperature")
                        a_max_tokens = gr.Slider(8, 1024, assistant_max_tokens, step=8, label="Assistant max tokens")
                    model_name = gr.Textbox(label="Assistant model", elem_id="assistant-model",
                                            placeholder="local: hub id or path (empty: offline SmolLM2); endpoint: served model name")
                    with gr.Group(visible=False) as openai_box:
                        base_url = gr.Textbox(label="Base URL", placeholder="http://localhost:8000/v1")
                        api_key = gr.Textbox(label="API key (kept in this browser session, never exported)", type="password")
                with gr.Accordion("Simulated user sampling", open=False):
                    with gr.Row():
                        temperature = gr.Slider(0, 2, 1.0, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1, 0.8, step=0.05, label="Top-p")
                    with gr.Row():
                        max_new_tokens = gr.Slider(8, 256, max_new_tokens, step=8, label="Max new tokens")
                        seed = gr.Number(0, label="Seed", precision=0)
                max_turns = gr.Slider(1, 30, max_turns, step=1, label="Max user turns (turn cap)")
                with gr.Accordion("Guardrails (apply to the next turn)", open=True):
                    first_token = gr.Checkbox(True, label="First-token filter (no 'I' / 'You' / 'Here' opening)", elem_id="g-first")
                    with gr.Row():
                        no_early_end = gr.Checkbox(True, label="No early ending", elem_id="g-end")
                        min_turns_end = gr.Number(0, label="Min user turns before ending (0 = never)", precision=0)
                    with gr.Row():
                        length = gr.Checkbox(True, label="Length thresholds", elem_id="g-length")
                        min_words = gr.Number(3, label="Min words", precision=0)
                        max_words = gr.Number(25, label="Max words", precision=0)
                    with gr.Row():
                        repetition = gr.Checkbox(True, label="Verbatim repetition", elem_id="g-repeat")
                        retry_cap = gr.Number(5, label="Retry cap", precision=0, minimum=0, maximum=32)
            with gr.Column(scale=3, min_width=420):
                chatbot = gr.Chatbot(label="Dialogue", height=520, elem_id="dialogue", buttons=["copy"])
                banner = gr.Markdown("Press **Step** or **Auto-run** to start.", elem_id="banner")
                with gr.Row():
                    b_user = gr.Button("Next user turn")
                    b_assistant = gr.Button("Next assistant turn")
                    b_step = gr.Button("Step", variant="primary")
                    b_auto = gr.Button("Auto-run", variant="primary")
                    b_stop = gr.Button("Stop", variant="stop")
                with gr.Row():
                    b_undo = gr.Button("Undo last turn", size="sm")
                    b_regen = gr.Button("Regenerate last turn", size="sm")
                    b_end = gr.Button("End dialogue", size="sm")
                    b_reset = gr.Button("Reset", size="sm")
                with gr.Row(visible=False) as you_box:
                    your_reply = gr.Textbox(label="Your reply as the assistant", scale=4, elem_id="your-reply")
                    b_send = gr.Button("Send", scale=1)
                with gr.Accordion("Edit a turn", open=False):
                    with gr.Row():
                        edit_no = gr.Number(1, label="Turn #", precision=0, minimum=1, scale=1)
                        edit_text = gr.Textbox(label="New text", scale=4)
                        b_edit = gr.Button("Apply edit", scale=1)
                summary_md = gr.Markdown(elem_id="summary")
                with gr.Row():
                    lengths_plot = gr.Plot(label="Turn lengths", elem_id="lengths-plot")
                    p_end_plot = gr.Plot(label="p_end", elem_id="pend-plot")
                with gr.Accordion("Export / import", open=False):
                    with gr.Row():
                        b_export = gr.Button("Export JSONL")
                        export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
                        import_file = gr.File(label="Import JSONL", file_types=[".jsonl", ".json"], elem_id="import-file")
                    transcript = gr.Textbox(label="Transcript (Markdown)", lines=6, buttons=["copy"], elem_id="transcript")

        settings_inputs = [temperature, top_p, max_new_tokens, seed, max_turns, first_token, no_early_end,
                           min_turns_end, length, min_words, max_words, repetition, retry_cap]
        backend_inputs = [backend_kind, system_prompt, a_temperature, a_max_tokens, base_url, model_name, api_key]
        view = [state, chatbot, banner, lengths_plot, p_end_plot, summary_md, transcript]
        gen_inputs = [state, intent, *settings_inputs, *backend_inputs]
        n_set = len(settings_inputs)

        def generator(role: str | None, max_new: int | None):
            def handler(request: gr.Request, dialogue, intent_text, *values):
                yield from _generate(dialogue, intent_text, list(values[:n_set]), list(values[n_set:]), request,
                                     role, max_new)
            return handler

        model_events = {"next_user_turn": generator("user", 1), "next_assistant_turn": generator("assistant", 1),
                        "step": generator(None, 2), "auto_run": generator(None, None)}
        buttons = {"next_user_turn": b_user, "next_assistant_turn": b_assistant, "step": b_step, "auto_run": b_auto}
        running = [buttons[name].click(fn, gen_inputs, view, api_name=name, concurrency_id="model", concurrency_limit=1)
                   for name, fn in model_events.items()]

        def regen(request: gr.Request, dialogue, intent_text, *values):
            if dialogue is None or not dialogue.turns:
                raise gr.Error("Nothing to regenerate.")
            yield from _generate(engine.undo(dialogue), intent_text, list(values[:n_set]), list(values[n_set:]),
                                 request, None, 1, reseed_from=dialogue)
        running.append(b_regen.click(regen, gen_inputs, view, api_name="regenerate", concurrency_id="model"))

        def stop(request: gr.Request):
            _stop_event(_session(request)).set()
        b_stop.click(stop, None, None, api_name="stop", concurrency_limit=None, queue=False)

        def update_live(request: gr.Request, *values):
            try:
                _live[_session(request)] = settings_from_inputs(*values)
            except ValueError as exc:
                gr.Warning(str(exc))
        gr.on([c.change for c in settings_inputs], update_live, settings_inputs, None, api_name="update_settings",
              concurrency_limit=None, queue=False)

        def plain(fn):
            def handler(dialogue, *args):
                if dialogue is None:
                    raise gr.Error("There is no dialogue yet.")
                return render(_guarded(fn, dialogue, *args))
            return handler

        b_undo.click(plain(engine.undo), [state], view, api_name="undo")
        b_end.click(plain(engine.end_by_researcher), [state], view, api_name="end_dialogue")
        b_edit.click(plain(lambda d, n, t: engine.edit_turn(d, int(n) - 1, t)), [state, edit_no, edit_text], view,
                     api_name="edit_turn")

        def send(dialogue, intent_text, text, *values):
            dialogue = _guarded(_begin, dialogue, intent_text)
            return render(_guarded(engine.researcher_turn, dialogue, text, settings_from_inputs(*values))) + ("",)
        b_send.click(send, [state, intent, your_reply, *settings_inputs], view + [your_reply], api_name="send_reply")
        your_reply.submit(send, [state, intent, your_reply, *settings_inputs], view + [your_reply], api_name=False)

        def reset(intent_text):
            return render(Dialogue(intent=(intent_text or "").strip()))
        b_reset.click(reset, [intent], view, api_name="reset")

        def export(dialogue):
            if dialogue is None or not dialogue.turns:
                raise gr.Error("Nothing to export yet.")
            folder = Path(tempfile.mkdtemp(prefix="usersim_"))
            path = folder / f"dialogue-{dialogue.id}.jsonl"
            path.write_text(dialogues_to_jsonl([dialogue]), encoding="utf-8")
            return str(path)
        b_export.click(export, [state], [export_file], api_name="export_jsonl")

        def load(file):
            if file is None:
                return (gr.skip(),) * (len(view) + 1)
            try:
                dialogues = dialogues_from_jsonl(Path(file if isinstance(file, str) else file.name).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise gr.Error(f"Could not import: {exc}") from exc
            if not dialogues:
                raise gr.Error("The file holds no dialogue.")
            if len(dialogues) > 1:
                gr.Warning(f"The file holds {len(dialogues)} dialogues; showing the first.")
            return render(dialogues[0]) + (dialogues[0].intent,)
        import_file.upload(load, [import_file], view + [intent], api_name="import_jsonl")

        for ds, members in intent_sets:
            ds.click(lambda i, m=members: m[i].intent, [ds], [intent], api_name=False)

        def show_backend(kind):
            return gr.update(visible=kind == "openai"), gr.update(visible=kind == "researcher")
        backend_kind.change(show_backend, [backend_kind], [openai_box, you_box], api_name=False)
        demo.load(lambda: model_info(), None, [info], api_name=False)
    return demo
