"""Every error a researcher or an API caller may see, in one stdlib-only module.

They live in the core (not beside torch or httpx) so that the page, the CLIs and the tests
can tell an expected failure from a bug without importing a model or a network client.
"""

from __future__ import annotations


class GenerationCancelled(RuntimeError):
    """The researcher pressed Stop; the partial turn is discarded, the dialogue kept."""


class BackendError(RuntimeError):
    """A model endpoint or backend could not answer (server down, timeout, bad reply...);
    the message names the backend, never a host path or secret."""


class ContextTooLong(ValueError):
    """A prompt does not fit a model's context, even after trimming what may be trimmed."""


class DialogueOver(RuntimeError):
    """No more turns: the user ended it, the turn cap was hit, or the researcher ended it."""


class NeedsResearcher(RuntimeError):
    """The assistant's turn is the researcher's to type ("You are the assistant")."""


# Failures that are the input's or a backend's, not the app's: shown as a message, never as
# a traceback, and never change the dialogue.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, BackendError, DialogueOver, NeedsResearcher)
