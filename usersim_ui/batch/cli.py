"""The batch-run command line: which user and assistant models a spec names, and ``main``.

Usage is in :mod:`usersim_ui.batch.runner`'s docstring and ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from usersim_ui.assistants.registry import SPEC_FORMS, kind_of, parse_spec
from usersim_ui.batch import runner
from usersim_ui.batch.runner import (
    INTENTS_SHAPE,
    Arm,
    BatchLocked,
    Job,
    Serialised,
    output_lock,
    plan,
    read_intents,
    read_records,
    run_batch,
    write_reports,
)
from usersim_ui.core.dialogue import SamplingSettings
from usersim_ui.core.guardrails import parse_guardrails
from usersim_ui.users.batcher import TurnBatcher


def tiny_simulator() -> Any:
    """The tiny random-weight UserLM-shaped model (tests and smoke runs; its text is noise)."""
    from usersim_ui.inference.model_loading import LoadedModel
    from usersim_ui.inference.tiny_userlm import (
        llama3_userlm_tokenizer,
        tiny_userlm_model,
    )
    from usersim_ui.prompts.formats import UserLMFormat
    from usersim_ui.users.local import UserSimulator

    tok = llama3_userlm_tokenizer()
    return UserSimulator(LoadedModel(tiny_userlm_model(), tok, "tiny-userlm (random weights)", "cpu"), UserLMFormat(tok))


def user_tokenizer_and_format(choice: str | None) -> tuple[Any, Any]:
    """The tokenizer and prompt format of the model a user server runs (ids are built here)."""
    from usersim_ui.prompts.formats import PromptedUserFormat, UserLMFormat

    choice = choice or "userlm"
    if choice == "tiny":
        from usersim_ui.inference.tiny_userlm import llama3_userlm_tokenizer

        tok = llama3_userlm_tokenizer()
        return tok, UserLMFormat(tok)
    if choice == "baseline":
        from usersim_ui.inference.model_loading import offline_chat_model

        tok = offline_chat_model().tokenizer
        return tok, PromptedUserFormat(tok)
    from transformers import AutoTokenizer

    from usersim_ui.prompts.userlm import USERLM_MODEL_ID

    tok = AutoTokenizer.from_pretrained(USERLM_MODEL_ID if choice == "userlm" else choice)
    return tok, UserLMFormat(tok)


def served_model(url: str, timeout_s: float = 10.0) -> str:
    """The first model a server lists at ``/models``."""
    import httpx

    from usersim_ui.core.errors import BackendError

    try:
        data = httpx.get(url.rstrip("/") + "/models", timeout=timeout_s).json()
        return str(data["data"][0]["id"])
    except Exception as exc:  # noqa: BLE001
        raise BackendError(f"user simulator server {url}: could not list its models ({exc}); pass --user-server-model") from exc


def make_assistant(spec: str, seed: int, max_tokens: int, max_turns: int) -> Any:
    """An ``--assistant`` spec (``assistants.registry.parse_spec``) -> a backend. The CLI is run by
    the host, so an endpoint gets the host's ``OPENAI_API_KEY``."""
    from usersim_ui.assistants.registry import BackendSpec, make_backend

    return make_backend(parse_spec(spec, BackendSpec(max_tokens=max_tokens, seed=seed,
                                                     api_key=os.environ.get("OPENAI_API_KEY", ""))))


def server_urls(values: list[str]) -> list[str]:
    """``--user-server`` as given (repeated, comma-separated, or both) -> the replicas, in order, once each."""
    urls = list(dict.fromkeys(u.strip().rstrip("/") for v in values for u in v.split(",") if u.strip()))
    if not urls:
        raise SystemExit("--user-server: no URL given")
    return urls


# ---- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m usersim_ui.batch", description=runner.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intents", default="sample", help="'sample' or a .jsonl (intent, id) / .txt (one per line) file")
    p.add_argument("--max-intents", type=int, default=None, help="only the first N intents")
    p.add_argument("--samples", type=int, default=3, help="dialogues per intent and arm")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every (intent, sample) K times with fresh seeds (recorded per dialogue); the report shows "
                        "each metric's spread across repeats, the noise floor beside every A-B difference (1: today's "
                        "seeds and keys)")
    p.add_argument("--assistant", default="local", help=f"{SPEC_FORMS} (an endpoint's key from OPENAI_API_KEY)")
    p.add_argument("--assistant-b", default=None, help="B arm's assistant (makes it an A/B run)")
    p.add_argument("--guardrails", default=None, help="A arm's guardrails: off | name=value,... (default: the paper's)")
    p.add_argument("--guardrails-b", default=None, help="B arm's guardrails, e.g. off or first_token=0,length=0")
    p.add_argument("--out", required=True, help="runs/NAME.jsonl; NAME.csv, NAME.dialogues.csv, NAME.html beside it")
    p.add_argument("--concurrency", type=int, default=1, help="dialogues in flight (in-process: their user turns "
                                                                  "are batched together)")
    p.add_argument("--user-server", action="append", default=None,
                   help="completions base URL (…/v1) running the user model: repeat it or separate URLs by commas "
                        "for replicas (each dialogue stays on one, by sha256 of its key), or give one router")
    p.add_argument("--routing-header", default="X-SMG-Routing-Key",
                   help="header carrying each dialogue's key on every user-turn request, for a router's session "
                        "affinity (sglang-router --policy manual reads X-SMG-Routing-Key); '' sends none")
    p.add_argument("--user-server-model", default=None, help="model name on the user servers (default: their first)")
    p.add_argument("--user-model", default=None, help="userlm | baseline | a path (default: by device); with "
                                                      "--user-server: whose tokenizer/format the server runs")
    p.add_argument("--max-turns", type=int, default=6, help="user turns before the cap ends a dialogue")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=96, help="per user turn")
    p.add_argument("--assistant-max-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request to a user server")
    p.add_argument("--limit", type=int, default=None, help="stop after N new dialogues (resume later)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the intervals")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """The batch, holding ``--out``'s lock from before the models load until the reports are
    written: a second run on the same file is refused at once (exit 2, naming the holder), and
    the lock of a run that was killed is taken over."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        with output_lock(out) as stale:
            if stale:
                print(f"took over the lock left by a run that is gone (pid {stale.get('pid', '?')}, started "
                      f"{stale.get('started', '?')})", file=sys.stderr)
            return _main(args)
    except BatchLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from usersim_ui.inference.memory import limit_malloc_growth

    limit_malloc_growth()  # many threads, one model on the CPU: keep RSS flat (memory.py says why)
    arm_a = Arm("A", args.assistant, parse_guardrails(args.guardrails))
    arms = [arm_a]
    if args.assistant_b or args.guardrails_b:
        arms.append(Arm("B", args.assistant_b or args.assistant, parse_guardrails(args.guardrails_b, arm_a.guardrails)))
    for arm in arms:  # a bad spec stops the run here, not in every one of its dialogues
        try:
            parse_spec(arm.assistant)
        except ValueError as exc:
            print(f"error: --assistant{'-b' if arm.name == 'B' else ''}: {exc}", file=sys.stderr)
            return 2
    try:
        found = read_intents(args.intents)
    except (OSError, ValueError) as exc:
        print(f"error: {args.intents}: {exc}", file=sys.stderr)
        return 2
    for problem in found.problems:  # listed and skipped: one bad line does not stop the batch
        print(f"{args.intents}: {problem} (skipped)", file=sys.stderr)
    if found.problems:
        print(f"({INTENTS_SHAPE})", file=sys.stderr)
    intents = found.intents[: args.max_intents]
    if not intents:
        print(f"error: {args.intents}: no intent to run", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    jobs = plan(intents, args.samples, arms, args.seed, repeats=args.repeats)
    by_name = {a.name: a for a in arms}
    sampling = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
    from usersim_ui.core.transitions import RunSettings

    settings = {a.name: RunSettings(guardrails=a.guardrails, sampling=sampling, max_turns=args.max_turns) for a in arms}
    model_lock = threading.Lock()
    replica_for: Callable[[Job], str | None] = lambda job: None
    if args.user_server:
        from usersim_ui.users.remote import (
            CompletionsUserSimulator,
            RoutedUser,
            replica_index,
        )

        urls = server_urls(args.user_server)
        tok, fmt = user_tokenizer_and_format(args.user_model)
        model = args.user_server_model or served_model(urls[0])
        sims = [CompletionsUserSimulator(u, model, tok, fmt, timeout_s=args.timeout) for u in urls]
        header = args.routing_header

        def simulator_for(job: Job) -> Any:  # one replica per dialogue; its key for a router in front
            sim = sims[replica_index(job.key, len(sims))]
            return RoutedUser(sim, job.key, header) if header else sim
        replica_for = lambda job: urls[replica_index(job.key, len(urls))]  # noqa: E731
    else:
        if args.user_model == "tiny":
            local = tiny_simulator()
        else:
            from usersim_ui.users.registry import default_simulator

            local = default_simulator(args.user_model)
        # dialogues in flight share the model: their waiting user turns go as one batched call
        shared = TurnBatcher(local, model_lock) if args.concurrency > 1 else Serialised(local, model_lock)
        simulator_for = lambda job: shared  # noqa: E731

    def backend_for(job: Job) -> Any:
        spec = by_name[job.arm].assistant
        backend = make_assistant(spec, job.seed, args.assistant_max_tokens, args.max_turns)
        return Serialised(backend, model_lock) if kind_of(parse_spec(spec)).uses_local_model else backend

    out = Path(args.out)
    print(f"{len(jobs)} dialogues planned ({len(intents)} intents x {args.samples} samples x {len(arms)} arm(s)"
          + (f" x {args.repeats} repeats" if args.repeats > 1 else "") + f") -> {out}",
          file=sys.stderr)
    result = run_batch(jobs, simulator_for, backend_for, lambda job: settings[job.arm], out,
                       concurrency=args.concurrency, limit=args.limit, replica_for=replica_for,
                       show_bar=not args.no_progress, lock=False)  # main holds the lock
    print(f"wrote {result.written}, skipped {result.skipped} already done, {result.failed} failed, "
          f"{result.elapsed_s:.1f} s", file=sys.stderr)
    calls = getattr(simulator_for(jobs[0]), "calls", None) if jobs else None
    if isinstance(calls, list) and calls:
        print(f"user turns batched: {sum(calls)} turns in {len(calls)} model calls", file=sys.stderr)
    if read_records(out):
        report = write_reports(out, n_boot=args.bootstrap, seed=args.seed)
        for kind, path in report["paths"].items():
            if path.exists():
                print(f"{kind}: {path}")
    return 0 if result.failed == 0 else 1


