"""Model turns as ZeroGPU runs them, and the same code everywhere else.

On a ZeroGPU Space ``@spaces.GPU`` runs :func:`model_turn_stream` in a forked, reused worker
process: arguments and yields are pickled across; an Event made in the main process is a
fork-time copy there. So the stop signal is made *inside* the worker, generation runs in a
thread beside it, and the function yields the turn's latest draft per token (and a heartbeat
every 20 ms between tokens, since the worker looks at its stop event only when the function yields). The main process
(:func:`run_model_turn`) checks its own Stop between heartbeats and closes the stream; closing
sets the worker's stop event, the worker closes our generator at its next yield, and its
``finally`` stops ``generate()`` within one more token. Outside ZeroGPU the decorator is a
no-op and the same generator runs in-process, with the same stop path.

Errors cross the process boundary as ``gr.Error`` carrying their message (``spaces`` turns
any other exception into its class name). Only turns that use the local model come here;
an OpenAI-compatible endpoint or the researcher typing takes no GPU slice.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import gradio as gr
import spaces

from usersim_ui.app.streaming import with_drafts
from usersim_ui.assistants.registry import BackendSpec, kind_of, make_backend
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import Dialogue, Turn
from usersim_ui.core.errors import BackendError, ContextTooLong, GenerationCancelled
from usersim_ui.core.protocols import Draft, OnDraft
from usersim_ui.users.batched import alternative_turns
from usersim_ui.users.local import UserSimulator
from usersim_ui.users.registry import default_simulator
from usersim_ui.users.turn import sampling_rounds

# Errors a researcher can act on: shown as a message, never as a traceback.
USER_ERRORS = (ValueError, BackendError, transitions.DialogueOver, transitions.NeedsResearcher, ContextTooLong)
GPU_SECONDS_MAX = 120  # ZeroGPU refuses ("illegal duration") much more than this on a shared GPU
HEARTBEAT_S = 0.02  # a yield at least this often, token or not: ZeroGPU's worker sees Stop only at a yield

_simulator: UserSimulator | None = None


def simulator() -> UserSimulator:
    """The app's simulated user, loaded once (at module level on a Space, before the first turn)."""
    global _simulator
    if _simulator is None:
        _simulator = default_simulator()
    return _simulator


def uses_local_model(dialogue: Dialogue, spec: BackendSpec) -> bool:
    """Whether the next turn runs a model in this process (and so needs the GPU and the model slot)."""
    return dialogue.next_role == "user" or kind_of(spec).uses_local_model


def gpu_seconds(dialogue: Dialogue, settings: transitions.RunSettings, spec: BackendSpec, seed: int | None) -> int:
    """The GPU slice to ask ZeroGPU for: the turn's token budget at a conservative 20 tokens/s."""
    if dialogue.next_role == "user":  # at most one generate() per round: the first sample, then the retries as a batch
        one_by_one = _simulator is not None and not _simulator.rules.batched_retries
        tokens = settings.sampling.max_new_tokens * len(sampling_rounds(settings.guardrails, settings.sampling,
                                                                        batched_retries=not one_by_one))
    else:
        tokens = spec.max_tokens
    return int(min(GPU_SECONDS_MAX, 15 + tokens / 20))


def as_gradio_error(exc: BaseException) -> gr.Error:
    """What crosses the ZeroGPU boundary intact: a gr.Error with the message (not a traceback)."""
    title = "Assistant failed" if isinstance(exc, BackendError) else "Cannot make this turn"
    return gr.Error(str(exc), title=title, print_exception=False)


def _make_turn(dialogue: Dialogue, settings: transitions.RunSettings, spec: BackendSpec, seed: int | None,
               stop: threading.Event, on_draft: OnDraft) -> Dialogue:
    if dialogue.next_role == "user":
        return transitions.user_turn(dialogue, simulator(), settings, stop, seed, on_draft)
    return transitions.assistant_turn(dialogue, make_backend(spec), settings, stop, seed, on_draft)


def _in_worker(job: Callable[[threading.Event, OnDraft], object]) -> Iterator[object]:
    """Run ``job(stop, on_draft)`` beside this generator (``streaming.with_drafts``), which yields
    the job's newest draft as it comes, ``None`` as a heartbeat between them (every
    HEARTBEAT_S), then the job's result. Closing the generator sets ``stop`` and waits for the
    job to end (the GPU slice is not handed back while generate() runs)."""
    stop = threading.Event()  # made here: in a ZeroGPU worker, an Event from the main process never fires

    def result(on_draft: OnDraft) -> Iterator[object]:
        yield job(stop, on_draft)

    try:
        yield from with_drafts(result, stop, every_s=0.0, heartbeat_s=HEARTBEAT_S, join_s=None)
    except USER_ERRORS as error:
        raise as_gradio_error(error) from None
    finally:
        stop.set()  # closed (Stop) or failed: generate() ends within one token


@spaces.GPU(duration=gpu_seconds)
def model_turn_stream(dialogue: Dialogue, settings: transitions.RunSettings, spec: BackendSpec,
                      seed: int | None) -> Iterator[Draft | None | Dialogue]:
    """One model turn: yields the turn's latest :class:`Draft` whenever it changed (a token, a
    new draw), ``None`` as a heartbeat between them, then the new dialogue. Plain data in and
    out, so that ZeroGPU can pickle it. ``seed`` None: the seed scheme's seed for the turn's
    position."""
    yield from _in_worker(lambda stop, on_draft: _make_turn(dialogue, settings, spec, seed, stop, on_draft))  # type: ignore[misc]


def fork_seconds(dialogue: Dialogue, settings: transitions.RunSettings, n: int) -> int:
    """The GPU slice for a fork: one turn's budget (its rows go as one batch) and a little per row."""
    return int(min(GPU_SECONDS_MAX, gpu_seconds(dialogue, settings, BackendSpec(), None) + n))


@spaces.GPU(duration=fork_seconds)
def fork_stream(dialogue: Dialogue, settings: transitions.RunSettings, n: int) -> Iterator[None | tuple[Turn, ...]]:
    """``n`` alternative next user turns of ``dialogue`` in one batched call (heartbeats, then
    the turns): the fork's work, in the GPU worker as a turn's is."""
    yield from _in_worker(lambda stop, _draft: tuple(  # type: ignore[misc]
        alternative_turns(simulator(), dialogue, settings, n, stop)))


def _drive(stream: Iterator[object], stop: threading.Event, on_draft: OnDraft | None, wanted: type) -> Any:
    """Drive a worker stream from the main process: Stop closes it between two heartbeats."""
    if stop.is_set():
        raise GenerationCancelled("stopped before the model began")
    try:
        for item in stream:
            if stop.is_set():
                raise GenerationCancelled("stopped during the model's work")
            if isinstance(item, wanted):
                return item
            if item is not None and on_draft is not None:
                on_draft(item)  # type: ignore[arg-type]
    finally:
        stream.close()  # type: ignore[attr-defined]
    raise GenerationCancelled("the model's work ended without a result")


def run_fork(dialogue: Dialogue, settings: transitions.RunSettings, n: int, stop: threading.Event) -> tuple[Turn, ...]:
    """:func:`fork_stream` driven from the main process, stoppable like a turn."""
    return _drive(fork_stream(dialogue, settings, n), stop, None, tuple)


def run_model_turn(dialogue: Dialogue, settings: transitions.RunSettings, spec: BackendSpec, seed: int | None,
                   stop: threading.Event, on_draft: OnDraft | None = None) -> Dialogue:
    """Drive :func:`model_turn_stream` from the main process; Stop closes it between two tokens;
    ``on_draft`` hears each draft the worker sends."""
    return _drive(model_turn_stream(dialogue, settings, spec, seed), stop, on_draft, Dialogue)
