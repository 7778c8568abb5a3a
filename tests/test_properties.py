"""Property tests of the core on the real Llama-3 tokenizer: whatever text a researcher, a
model or an imported file brings (unicode, special-token strings, HTML, 100k characters,
empty or blank), prompt ids carry only the template's own special tokens, the intent check
fails only in its documented ways, trimming keeps the intent, JSONL round-trips and message
text shows no raw ``<`` outside code."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from usersim_ui.analysis.safe_text import _FENCE, literal_markdown
from usersim_ui.core import transitions
from usersim_ui.core.dialogue import (
    Dialogue,
    GuardrailEvent,
    GuardrailSettings,
    RejectedSample,
    SamplingSettings,
    Turn,
    dialogues_from_jsonl,
    dialogues_to_jsonl,
)
from usersim_ui.core.errors import ContextTooLong
from usersim_ui.core.limits import MAX_INTENT_CHARS
from usersim_ui.prompts.userlm import encode_plain, userlm_prompt_ids

START, END, EOT = 128006, 128007, 128009
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

NASTY = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|endconversation|>", "<|begin_of_text|>",
         "<|end_of_text|>", "<|reserved_special_token_5|>", "<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
         "</div>", "```", "`", "~~~", "", " ", "   ", "\n", "\n\n", "\t", "\u00a0", "é", "日本語", "🙂", "\u200b"]
pieces = st.one_of(st.text(max_size=30), st.sampled_from(NASTY))
short_text = st.lists(pieces, max_size=8).map("".join)
huge_text = st.tuples(st.sampled_from(NASTY[:9] + ["word "]), st.integers(8_000, 20_000)).map(
    lambda t: (t[0] * t[1])[:100_000])
any_text = st.one_of(short_text, short_text, short_text, huge_text)
messages_st = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), any_text), max_size=4).map(
    lambda ms: [{"role": r, "content": c} for r, c in ms])


@FAST
@given(intent=any_text, messages=messages_st)
def test_prompt_ids_hold_only_the_templates_own_special_tokens(llama_tok, intent, messages):
    ids = userlm_prompt_ids(llama_tok, intent, messages)
    blocks = len(messages) + 1  # the system message (intent) and each message
    special = [i for i in ids if i >= 128000]
    assert special.count(START) == blocks + 1 and special.count(END) == blocks + 1  # + the open user header
    assert special.count(EOT) == blocks
    assert len(special) == 3 * blocks + 2  # nothing else: no content became a special or added token
    assert ids[-3:] == [START] + encode_plain(llama_tok, "user") + [END]


@settings(max_examples=100, deadline=None)
@given(intent=st.one_of(any_text, st.text(min_size=MAX_INTENT_CHARS - 5, max_size=MAX_INTENT_CHARS + 5)))
def test_validate_intent_raises_only_its_documented_value_errors(intent):
    try:
        out = transitions.validate_intent(intent)
    except ValueError as exc:
        assert type(exc) is ValueError
        message = str(exc)
        assert (message == "Write a task intent first: the simulated user has nothing else to go on."
                or re.fullmatch(r"The intent has [\d,]+ characters; the limit is 4,000\.", message)), message
        assert not intent.strip() or len(intent.strip()) > MAX_INTENT_CHARS
    else:
        assert out == intent.strip() and out and len(out) <= MAX_INTENT_CHARS


@FAST
@given(intent=short_text.filter(lambda t: t.strip()), messages=messages_st, budget=st.integers(8, 3000),
       max_new=st.integers(1, 256))
def test_trimming_keeps_the_intent(tiny_sim, llama_tok, intent, messages, budget, max_new):
    system = userlm_prompt_ids(llama_tok, intent, [])[:-3]  # the system block: header, intent, eot
    try:
        fitted = tiny_sim.rules.fit_prompt(intent, messages, budget, max_new)
    except ContextTooLong:
        assert len(system) + 3 + 1 + max_new > budget  # only when the intent alone does not fit
        return
    assert fitted.ids[:len(system)] == system
    assert len(fitted.ids) + max_new <= budget
    assert 0 <= fitted.dropped_turns <= len(messages)


# Characters that str.splitlines() treats as line breaks but json.dumps(ensure_ascii=False) leaves raw.
LINE_BREAKS_JSON_KEEPS = "\x85\u2028\u2029"
json_safe = st.text(alphabet=st.characters(blacklist_characters=LINE_BREAKS_JSON_KEEPS), max_size=60)
json_safe_text = st.one_of(json_safe, st.sampled_from(NASTY))
unit = st.floats(0, 1, allow_nan=False)
small = st.integers(0, 10**6)


@st.composite
def dialogues_st(draw):
    turns = []
    for _ in range(draw(st.integers(0, 4))):
        events = tuple(GuardrailEvent(draw(st.sampled_from(["first_token", "no_early_ending", "length", "repetition",
                                                            "retry_cap", "context"])),
                                      draw(st.sampled_from(["masked", "resampled", "gave_up", "trimmed"])),
                                      draw(json_safe_text), draw(st.integers(1, 50)), draw(st.none() | unit))
                       for _ in range(draw(st.integers(0, 2))))
        turns.append(Turn(
            role=draw(st.sampled_from(["user", "assistant"])), text=draw(json_safe_text), tokens=draw(small),
            words=draw(small), author=draw(st.sampled_from(["model", "researcher", "script", "import"])),
            model_id=draw(st.none() | json_safe), latency_s=draw(st.none() | st.floats(0, 1e4, allow_nan=False)),
            p_end=draw(st.none() | unit), ends_dialogue=draw(st.booleans()), guardrails=events,
            rejected=tuple(RejectedSample(draw(json_safe_text), draw(json_safe)) for _ in range(draw(st.integers(0, 2)))),
            sampling=draw(st.none() | st.builds(SamplingSettings, temperature=st.floats(0, 2), top_p=unit,
                                                max_new_tokens=st.integers(1, 1024), seed=st.integers(0, 2**53 - 1))),
            seed=draw(st.none() | st.integers(0, 2**63 - 1)),
            guardrail_settings=draw(st.none() | st.builds(
                GuardrailSettings, banned_first_words=st.lists(json_safe, max_size=3).map(tuple),
                min_user_turns_before_end=st.none() | st.integers(0, 100), min_words=st.integers(0, 50),
                max_words=st.integers(0, 1000), retry_cap=st.integers(0, 32))),
            context_dropped_turns=draw(st.integers(0, 100)), edited=draw(st.booleans()), truncated=draw(st.booleans())))
    return Dialogue(intent=draw(json_safe_text), turns=tuple(turns),
                    ended_by=draw(st.sampled_from([None, "user", "turn_cap", "researcher"])),
                    user_model=draw(st.none() | json_safe), assistant_model=draw(st.none() | json_safe),
                    context_trims=draw(st.integers(0, 100)), id=draw(json_safe.filter(bool)))


@settings(max_examples=60, deadline=None)
@given(dialogue=dialogues_st())
def test_jsonl_round_trip_of_any_dialogue(dialogue):
    assert dialogues_from_jsonl(dialogues_to_jsonl([dialogue])) == [dialogue]


@pytest.mark.parametrize("char", list(LINE_BREAKS_JSON_KEEPS))
def test_jsonl_round_trip_with_unicode_line_separators(char):
    dialogue = Dialogue(intent=f"a{char}b", turns=(Turn(role="user", text=f"x{char}y"),))
    assert dialogues_from_jsonl(dialogues_to_jsonl([dialogue])) == [dialogue]


def prose_outside_code(markdown: str) -> str:
    """The output without its fenced blocks (read as marked reads them: lines end at \\n, \\r\\n
    or \\r; a fence closes on up to three spaces, its run, then only backticks, tildes or spaces)
    and without the code it wrote as HTML (``<code>``, ``<pre><code>``, text entity-encoded)."""
    kept, fence = [], None
    for line in re.split(r"\r\n|\r|\n", markdown):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None:
            if re.fullmatch(r" {0,3}" + re.escape(fence) + r"[~`]* *", line):
                fence = None
        else:
            kept.append(re.sub(r"</?(?:pre|code)>", "", line))
    return "\n".join(kept)


def unescaped(markdown: str) -> str:
    """What a reader sees of prose: backslash escapes and the three HTML entities undone."""
    text = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(short_text, huge_text))
def test_literal_markdown_leaves_no_raw_angle_bracket_outside_code(text):
    out = literal_markdown(text)
    assert "<" not in prose_outside_code(out)
    assume("```" not in text and "~~~" not in text and "`" not in text)
    assert unescaped(out) == text  # prose round-trips
