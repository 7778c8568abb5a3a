"""The assistant kinds, in one table: what the page offers, what each builds, whether it needs
the local model (and so the GPU and the model slot), and the spec strings the CLIs take.

A new kind is a row here plus its module; the Studio's radio, the batch tab, both CLIs and
the ZeroGPU path all read this table.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from usersim_ui.assistants.scripted import ScriptedAssistant
from usersim_ui.core.errors import BackendError
from usersim_ui.core.limits import MAX_TURNS
from usersim_ui.core.protocols import AssistantBackend

if TYPE_CHECKING:
    from usersim_ui.inference.model_loading import LoadedModel

# The table is read where no model is wanted (the CLIs' help, the page's choices): each kind's
# module (torch, the openai client) is imported by its factory, when a backend is built.

log = logging.getLogger(__name__)

SCRIPTED_REPLIES = (
    "Sure, I can help with that. Could you tell me a bit more about what you need?",
    "Thanks, that helps. Here is a first suggestion; tell me what you think.",
    "Good question. There are a few options; which matters most to you?",
    "Understood. Let me refine that for you.",
)


@dataclass(frozen=True)
class BackendSpec:
    """What the researcher chose as assistant, as plain data (picklable for ZeroGPU workers)."""

    kind: str = "local"  # a key of KINDS
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.7
    max_tokens: int = 128
    base_url: str = ""
    model: str = ""
    api_key: str = field(default="", repr=False)
    seed: int = 0


LOAD_FAILURE_MEMORY_S = 600.0  # a model that failed to load is not tried again for this long
_load_failures: dict[str, tuple[float, str]] = {}


@functools.lru_cache(maxsize=2)
def local_chat_model(model_id: str) -> LoadedModel:
    """A transformers chat model by hub id or path, kept in memory once loaded."""
    from usersim_ui.inference.model_loading import load_chat_model

    return load_chat_model(model_id)


def _local(spec: BackendSpec) -> AssistantBackend:
    """Which ids reach here is decided before (the page's trust boundary allows only the host's list;
    the CLIs are run by the host). A load that fails says so without the id or path: the message
    reaches the page, the details go to the host's log. The failure is remembered for a while, so
    that a broken model does not hold the shared model slot for a load attempt on every turn."""
    from usersim_ui.assistants.local import TransformersAssistant
    from usersim_ui.inference.model_loading import offline_chat_model

    model_id = spec.model.strip()
    failed = _load_failures.get(model_id)
    if failed is not None and time.monotonic() - failed[0] < LOAD_FAILURE_MEMORY_S:
        raise BackendError(f"Could not load the local assistant model ({failed[1]}); try again later.")
    try:
        loaded = local_chat_model(model_id) if model_id else offline_chat_model()
    except Exception as exc:  # noqa: BLE001 - no such path, no hub access, not a model folder, bad JSON...
        log.warning("local assistant model %r failed to load: %s: %s", model_id, type(exc).__name__, exc)
        _load_failures[model_id] = (time.monotonic(), type(exc).__name__)
        raise BackendError(f"Could not load the local assistant model ({type(exc).__name__}); "
                           "the host's log has the details.") from exc
    return TransformersAssistant(loaded, system_prompt=spec.system_prompt, temperature=spec.temperature,
                                 max_new_tokens=spec.max_tokens, seed=spec.seed)


def _openai(spec: BackendSpec) -> AssistantBackend:
    from usersim_ui.assistants.openai import OpenAIAssistant

    if not spec.base_url.strip() or not spec.model.strip():
        raise ValueError("An OpenAI-compatible backend needs a base URL and a model name.")
    return OpenAIAssistant(base_url=spec.base_url.strip(), model=spec.model.strip(), api_key=spec.api_key,
                           system_prompt=spec.system_prompt, temperature=spec.temperature, max_tokens=spec.max_tokens)


def _scripted(spec: BackendSpec) -> AssistantBackend:
    return ScriptedAssistant([SCRIPTED_REPLIES[i % len(SCRIPTED_REPLIES)] for i in range(MAX_TURNS)])


SPEC_PARTS = {"model": "MODEL", "base_url": "URL"}  # a spec string's parts, as help texts name them


@dataclass(frozen=True)
class AssistantKind:
    name: str
    label: str  # what the page's radio says
    factory: Callable[[BackendSpec], AssistantBackend | None]
    uses_local_model: bool  # runs in this process: needs the GPU function and the model slot
    on_page: bool = True  # offered in the Studio
    typed_by_researcher: bool = False  # no model: the researcher types its turns (so no batch can run it)
    spec_parts: tuple[str, ...] = ()  # BackendSpec fields its spec string carries after "name:", in order
    parts_optional: bool = False  # the spec may be the name alone ("local": the default model)

    @property
    def spec_forms(self) -> list[str]:
        """How a spec string names this kind (``local``, ``local:MODEL``, ``openai:URL:MODEL``)."""
        full = ":".join([self.name, *(SPEC_PARTS[p] for p in self.spec_parts)])
        return [self.name, full] if self.spec_parts and self.parts_optional else [full]


KINDS: dict[str, AssistantKind] = {k.name: k for k in (
    AssistantKind("local", "Local model (SmolLM2-135M-Instruct)", _local, uses_local_model=True,
                  spec_parts=("model",), parts_optional=True),
    AssistantKind("openai", "OpenAI-compatible endpoint", _openai, uses_local_model=False,
                  spec_parts=("base_url", "model")),
    AssistantKind("researcher", "You are the assistant (type the replies)", lambda spec: None, uses_local_model=False,
                  typed_by_researcher=True),
    AssistantKind("scripted", "Scripted replies (no model)", _scripted, uses_local_model=False, on_page=False),
)}
PAGE_CHOICES = [(k.label, k.name) for k in KINDS.values() if k.on_page]
BATCH_CHOICES = [(k.label, k.name) for k in KINDS.values() if k.on_page and not k.typed_by_researcher]
# what a command line may name (it runs unattended: no kind whose turns the researcher types)
SPEC_FORMS = " | ".join(form for k in KINDS.values() if not k.typed_by_researcher for form in k.spec_forms)


def kind_of(spec: BackendSpec) -> AssistantKind:
    if spec.kind not in KINDS:
        raise ValueError(f"Unknown assistant backend {spec.kind!r}; one of {', '.join(KINDS)}.")
    return KINDS[spec.kind]


def _row(kind: object) -> AssistantKind | None:
    return KINDS.get(kind) if isinstance(kind, str) else None  # anything a page sends


def researcher_types(kind: object) -> bool:
    """Whether the kind named ``kind`` has the researcher type its turns."""
    row = _row(kind)
    return row is not None and row.typed_by_researcher


def needs_endpoint(kind: object) -> bool:
    """Whether the kind named ``kind`` talks to an endpoint (its URL and key boxes apply)."""
    row = _row(kind)
    return row is not None and "base_url" in row.spec_parts


def takes_model(kind: object) -> bool:
    """Whether the kind named ``kind`` is told which model to use (its model box applies)."""
    row = _row(kind)
    return row is not None and "model" in row.spec_parts


def make_backend(spec: BackendSpec) -> AssistantBackend | None:
    """The backend for a spec; None means the researcher types the assistant's turns."""
    return kind_of(spec).factory(spec)


def parse_spec(text: str, base: BackendSpec | None = None) -> BackendSpec:
    """A CLI spec string (:data:`SPEC_FORMS`: ``local``, ``local:MODEL``, ``openai:URL:MODEL``,
    ...) over ``base`` (sampling, system prompt, key). A URL holds colons: every part but the
    last takes what lies left of the last colons."""
    base = base or BackendSpec()
    name, _colon, rest = text.strip().partition(":")
    kind = KINDS.get(name)
    if kind is not None:
        parts = kind.spec_parts
        if not rest.strip() and (not parts or kind.parts_optional):  # "local", "local:", "scripted"
            return replace(base, kind=name, **{p: "" for p in parts})
        values = _split_parts(rest, parts)
        if parts and len(values) == len(parts) and all(v.strip() for v in values):
            return replace(base, kind=name, **dict(zip(parts, values)))
        if parts:
            raise ValueError(f"assistant {text!r}: use {' or '.join(kind.spec_forms)}")
    raise ValueError(f"unknown assistant {text!r}: {SPEC_FORMS}")


def _split_parts(rest: str, parts: tuple[str, ...]) -> list[str]:
    """A spec's parts. A URL holds colons (``http://host:8000/v1``) and so may a model name
    (``llama3:8b``): a URL part ends at the first colon after its path begins, else (no path)
    the parts split at the last colons."""
    if "base_url" in parts and parts[0] == "base_url" and len(parts) == 2:
        host_at = rest.find("://")
        path_at = rest.find("/", host_at + 3) if host_at >= 0 else -1
        cut = rest.find(":", path_at) if path_at >= 0 else -1
        if cut >= 0:
            return [rest[:cut], rest[cut + 1:]]
    return rest.rsplit(":", len(parts) - 1) if parts else []


def spec_text(spec: BackendSpec) -> str:
    """The spec string that :func:`parse_spec` reads back as ``spec``'s kind and parts (never
    the key: a spec string is written into records and reports)."""
    kind = kind_of(spec)
    values = [str(getattr(spec, p)) for p in kind.spec_parts]
    return ":".join([kind.name, *values]) if any(values) else kind.name
