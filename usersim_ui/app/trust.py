"""The trust boundary: every value a visitor sends (a URL, a model id, a key, text, a file, a
number) is checked here before it reaches a backend, and turned into what the host allows.

On a public Space a visitor is a stranger. Three rules follow, each read from the host's
environment, never from the visitor:

* **The host's key goes only where the host said.** ``OPENAI_API_KEY`` is sent to an endpoint
  only when its base URL is listed in ``USERSIM_TRUSTED_ENDPOINTS`` (comma-separated base
  URLs). Any other URL gets the key the visitor typed, or none.
* **The host chooses which local models load.** An empty box means the offline SmolLM2; any
  other id or path must be listed in ``USERSIM_LOCAL_MODELS``. A visitor's id is never loaded
  (a hub download or a path on the host's disk, in the shared model slot) and never echoed.
* **On a public host, endpoints are outside the host's network.** With ``USERSIM_PUBLIC=1``
  (the default where ``SPACE_ID`` is set, i.e. on a Hugging Face Space) a URL whose host is
  loopback, private, link-local or reserved is refused unless the host listed it as trusted.
  (The name is resolved once, here; a DNS answer that changes afterwards is not caught.)

Messages name the rule that refused a value and never repeat the value: a path, a URL with a
secret in it or a hostile string would otherwise come back to the page. Every refusal is a
``ValueError``, which the page shows as a toast and an API caller receives as an error.
No gradio here: the Studio's form (``app.form``) and the Batch tab both call these functions.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

from usersim_ui.assistants.registry import KINDS, BackendSpec
from usersim_ui.core.limits import MAX_TURN_CHARS, check_text

TRUSTED_ENDPOINTS_ENV = "USERSIM_TRUSTED_ENDPOINTS"
LOCAL_MODELS_ENV = "USERSIM_LOCAL_MODELS"
PUBLIC_ENV = "USERSIM_PUBLIC"
HOST_KEY_ENV = "OPENAI_API_KEY"

MAX_URL_CHARS = 500
MAX_KEY_CHARS = 400
MAX_MODEL_CHARS = 200
MAX_INTENTS_FILE_BYTES = 1024 * 1024  # ~250 intents of the longest allowed size; the tab runs at most 400 dialogues
OFFLINE_MODEL_NAMES = ("", "smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")

# A served model's name: what vLLM, llama.cpp, Ollama and OpenAI use ("org/model", "llama3:8b", "gpt-4o").
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
# An API key goes into an HTTP header: printable ASCII, no spaces.
_KEY = re.compile(r"[\x21-\x7e]+")
_URL_FORBIDDEN = set("<>\"'`{}|\\^") | {chr(c) for c in range(33)} | {"\x7f"}


# ---- numbers, text, choices -------------------------------------------------------------------

@dataclass(frozen=True)
class Refused:
    """What a number box hands its handler in place of a value it cannot take (``handlers.
    checked_numbers``): the handler refuses the event with ``message``, as for any bad input.
    Raising in the box's own preprocessing would end the page's event chain there, and the
    run buttons, locked for the run, would stay locked."""

    message: str


def raise_refused(*values: Any) -> None:
    """Refuse (ValueError) with the first :class:`Refused` among ``values``."""
    for value in values:
        if isinstance(value, Refused):
            raise ValueError(value.message)


def number(value: Any, label: str, low: float, high: float, whole: bool = True) -> float:
    """A finite number in [low, high] (a whole one unless ``whole`` is False); else a ValueError naming the box."""
    raise_refused(value)
    if value is None or value == "":
        raise ValueError(f"'{label}' is empty: enter a number.")
    if isinstance(value, bool):
        raise ValueError(f"'{label}' must be a number.")
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"'{label}' must be a number.") from None
    if not math.isfinite(result):
        raise ValueError(f"'{label}' must be a finite number between {low:g} and {high:g}.")
    if whole and not result.is_integer():
        raise ValueError(f"'{label}' must be a whole number; got {result:g}.")
    if not low <= result <= high:
        raise ValueError(f"'{label}' must be between {low:g} and {high:g}; got {result:g}.")
    return result


def text(value: Any, label: str, limit: int = MAX_TURN_CHARS) -> str:
    """A string within ``limit`` characters (None is empty); never cut silently."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"'{label}' must be text.")
    return check_text(value, f"'{label}'", limit)


def choice(value: Any, label: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"'{label}' must be one of: {', '.join(allowed)}.")
    return value


def choices(values: Any, label: str, allowed: Sequence[str]) -> list[str]:
    """A subset of ``allowed`` (None is none), without repeats, in the order given."""
    if values is None:
        return []
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ValueError(f"'{label}' must be a list of: {', '.join(allowed)}.")
    return list(dict.fromkeys(choice(v, label, allowed) for v in values))


# ---- endpoints and the host's key ---------------------------------------------------------------

def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def is_public() -> bool:
    """Whether this host serves strangers: ``USERSIM_PUBLIC`` says so, else being on a Space does."""
    flag = os.environ.get(PUBLIC_ENV, "").strip().lower()
    if flag:
        return flag in ("1", "true", "yes", "on")
    return bool(os.environ.get("SPACE_ID"))


def canonical_url(url: str) -> str:
    """A base URL as compared with the trusted list: scheme and host lower-cased, the scheme's
    default port and trailing slashes dropped. Raises ValueError when it is not an http(s) URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("The base URL must start with http:// or https:// and name a host.")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("The base URL's port must be a number from 1 to 65535.") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}" + (f"?{parts.query}" if parts.query else "")


def trusted_endpoints() -> frozenset[str]:
    """The base URLs the host lets receive its ``OPENAI_API_KEY`` (``USERSIM_TRUSTED_ENDPOINTS``)."""
    out = set()
    for url in _env_list(TRUSTED_ENDPOINTS_ENV):
        try:
            out.add(canonical_url(url))
        except ValueError:
            continue  # a host's typo trusts nothing rather than something else
    return frozenset(out)


def _inside_host_network(host: str) -> bool:
    """Whether ``host`` is, or resolves to, an address that is not on the public internet."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            raise ValueError("The base URL's host name could not be resolved.") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    return any(not a.is_global or a.is_multicast for a in addresses)


def endpoint_url(value: Any) -> str:
    """A visitor's base URL, checked: http(s), a host, no credentials or odd characters, and on
    a public host not inside the host's network (unless the host trusts it)."""
    url = text(value, "Base URL", MAX_URL_CHARS).strip()
    if not url:
        raise ValueError("An OpenAI-compatible endpoint needs a base URL, e.g. https://host/v1.")
    if any(c in _URL_FORBIDDEN for c in url):
        raise ValueError("The base URL may not contain spaces, quotes, angle brackets or control characters.")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("The base URL may not carry a user name or password: put a key in the API key box.")
    if parts.fragment:
        raise ValueError("The base URL may not have a #fragment.")
    canonical = canonical_url(url)
    if is_public() and canonical not in trusted_endpoints() and _inside_host_network(parts.hostname or ""):
        raise ValueError("On this public host the base URL may not point into the host's own network (loopback, "
                         f"private or link-local addresses); the host can allow one in {TRUSTED_ENDPOINTS_ENV}.")
    return url


def endpoint_model(value: Any) -> str:
    """The model name an endpoint serves (sent in the request body, shown in badges and errors)."""
    name = text(value, "Model", MAX_MODEL_CHARS).strip()
    if not name:
        raise ValueError("An OpenAI-compatible endpoint needs the name of the model it serves.")
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError("A model name may hold letters, digits and . _ : / @ + - only.")
    return name


def api_key(typed: Any, url: str) -> str:
    """The key for ``url``: the one the visitor typed; else the host's, only if the host trusts
    ``url``; else none. The host's key never goes to a URL a visitor chose."""
    key = text(typed, "API key", MAX_KEY_CHARS).strip()
    if key:
        if not _KEY.fullmatch(key):
            raise ValueError(f"An API key is printable ASCII without spaces, at most {MAX_KEY_CHARS} characters.")
        return key
    if canonical_url(url) in trusted_endpoints():
        return os.environ.get(HOST_KEY_ENV, "")
    return ""


# ---- local models ----------------------------------------------------------------------------------

def allowed_local_models() -> tuple[str, ...]:
    """The ids or paths the host lets visitors load (``USERSIM_LOCAL_MODELS``), beside the offline SmolLM2."""
    return tuple(_env_list(LOCAL_MODELS_ENV))


def _looks_like_path(entry: str) -> bool:
    return entry.startswith(("/", ".", "~")) or "\\" in entry or os.path.isabs(entry)


def local_model(value: Any) -> str:
    """The local assistant model a visitor asked for: "" (the offline SmolLM2) or an entry of the
    host's list. Anything else is refused before any load, without repeating what was typed."""
    name = text(value, "Assistant model", MAX_URL_CHARS).strip()
    if name in OFFLINE_MODEL_NAMES:
        return ""
    allowed = allowed_local_models()
    if name in allowed:
        return name
    shown = [m for m in allowed if not _looks_like_path(m)]  # the host's own paths are not shown either
    more = f" or one of: {', '.join(shown)}" if shown else ""
    raise ValueError("The local assistant loads only the models this host allows: leave 'Assistant model' empty for "
                     f"the offline SmolLM2{more}. (The host lists models in {LOCAL_MODELS_ENV}.)")


# ---- the assistant, whole -----------------------------------------------------------------------

def backend(kind: Any, system_prompt: Any, temperature: Any, max_tokens: Any, base_url: Any, model: Any,
            typed_key: Any, on_page_only: bool = True) -> BackendSpec:
    """The assistant a visitor chose, as a spec that carries only what its kind uses: a local
    model the host allows, or an endpoint with the visitor's key (the host's only if trusted)."""
    names = [k.name for k in KINDS.values() if k.on_page or not on_page_only]
    if not isinstance(kind, str) or kind not in names:
        raise ValueError(f"Unknown assistant backend; one of: {', '.join(names)}.")
    spec = BackendSpec(kind=kind, system_prompt=text(system_prompt, "Assistant system prompt"),
                       temperature=number(temperature, "Assistant temperature", 0, 2, whole=False),
                       max_tokens=int(number(max_tokens, "Assistant max tokens", 1, 4096)))
    if kind == "openai":
        url = endpoint_url(base_url)
        return replace(spec, base_url=url, model=endpoint_model(model), api_key=api_key(typed_key, url))
    if kind == "local":
        return replace(spec, model=local_model(model))
    return spec


# ---- files ------------------------------------------------------------------------------------------

def uploaded_file(value: Any, label: str, suffixes: Iterable[str], max_bytes: int) -> Path | None:
    """An uploaded file's path (None when nothing was uploaded), checked for kind and size.

    Gradio hands handlers a path inside its upload cache (and refuses API callers' paths outside
    it); the messages still name only the rule, never the path."""
    if value is None or value == "":
        return None
    raw = value if isinstance(value, (str, os.PathLike)) else getattr(value, "name", None) or getattr(value, "path", None)
    if not isinstance(raw, (str, os.PathLike)):
        raise ValueError(f"{label}: expected an uploaded file.")
    path = Path(raw)
    allowed = tuple(suffixes)
    if path.suffix.lower() not in allowed:
        raise ValueError(f"{label}: the file must end in {' or '.join(allowed)}.")
    try:
        size = path.stat().st_size
        regular = path.is_file()
    except OSError:
        raise ValueError(f"{label}: the uploaded file could not be read; upload it again.") from None
    if not regular:
        raise ValueError(f"{label}: expected an uploaded file.")
    if size > max_bytes:
        raise ValueError(f"{label}: the file is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:g} MB.")
    return path
