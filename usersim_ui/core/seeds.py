"""The one seed scheme: every sample the app draws has a seed derived here, and every turn
records the seed that reproduces it.

A turn's seed is derived from the researcher's base seed and the turn's position, so a rerun
with the same settings gives the same dialogue. Regenerate derives a fresh seed from the
turn's own, so each press gives a new sample that is itself reproducible from its record.
Inside a guarded user turn, resampling round ``r`` is drawn with ``draw_seed(turn_seed, r)``,
whichever engine draws it (torch in-process, or a completions server's ``seed``), so a turn's
recorded seed reproduces every sample it drew, resamples included.
"""

from __future__ import annotations

import hashlib

MAX_SEED = 2**53 - 1  # what a JSON number (and a browser's number box) holds exactly
_MODULUS = 2**63  # torch.manual_seed and OpenAI's `seed` take a signed 64-bit integer


def _derive(*parts: int | str) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _MODULUS


def validate_seed(seed: float | int | None) -> int:
    """A base seed the researcher typed: a whole number in [0, 2**53)."""
    if seed is None:
        raise ValueError("The seed box is empty: enter a whole number (0 is fine).")
    if float(seed) != int(seed) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"The seed must be a whole number from 0 to {MAX_SEED}; got {seed!r}.")
    return int(seed)


def turn_seed(base_seed: int, turn_index: int) -> int:
    """The first draw of the turn at ``turn_index`` (0-based) of a dialogue run with ``base_seed``."""
    return _derive("turn", base_seed, turn_index)


def regenerated_seed(previous_seed: int | None, base_seed: int, turn_index: int) -> int:
    """A new draw for a turn being regenerated; different from the previous one every time."""
    return _derive("regen", previous_seed if previous_seed is not None else turn_seed(base_seed, turn_index))


def alternative_seeds(base_seed: int, turn_index: int, n: int) -> list[int]:
    """The seeds of ``n`` alternatives for the user turn at ``turn_index`` (a fork): the first is
    the turn's own seed (what Step makes there), the others derived from it; each alternative
    records its seed, so whichever the researcher continues from replays."""
    first = turn_seed(base_seed, turn_index)
    return [first] + [_derive("alternative", first, k) for k in range(1, n)]


DRAW_MODULUS = 2**31  # llama-server keeps a request's seed in uint32 and adds the choice index


def draw_seed(seed: int, round_no: int) -> int:
    """The seed a sampler gets for round ``round_no`` of the turn whose seed is ``seed``: the
    ``torch.Generator`` of its rows in-process, a request's ``seed`` on a server (choice ``i`` of ``n`` there
    takes ``draw_seed + i``). Below 2**31 so that every server keeps it exactly."""
    return round_seed(seed, round_no) % DRAW_MODULUS


def round_seed(seed: int, round_no: int) -> int:
    """The seed of resampling round ``round_no`` inside one turn (round 0: the turn seed)."""
    return seed if round_no == 0 else _derive("round", seed, round_no)


# ---- batch runs ------------------------------------------------------------------------------

def sample_seed(base_seed: int, intent_id: str, sample: int, repeat: int = 0) -> int:
    """The seed of one (intent, sample, repeat), shared by both arms of an A/B.

    Repeat 0 is the seed every batch has always had (so files written before ``--repeats``
    existed resume unchanged); repeat ``r`` > 0 hashes ``r`` in as one more part, the way every
    seed here derives from its position: a fresh seed, reproducible from the record. (sha256, not
    :func:`_derive`: batch files written with it must keep resuming.)"""
    parts = f"{base_seed}\0{intent_id}\0{sample}" + (f"\0repeat\0{repeat}" if repeat else "")
    digest = hashlib.sha256(parts.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31
