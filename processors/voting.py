"""Reading a judge's verdict out of its raw text, and the majority over m votes. Pure.

What counts as a vote (decided here, tested in tests/processors/test_voting.py):

- Only the judge's *own final answer* is read: the last non-empty line of its output, after
  every quoted span is removed, must carry the marker ``Final answer:`` followed by
  ``\\boxed{v}``. Text inside the data fences the prompt used (``<<<DATA-nonce ... DATA-nonce>>>``),
  markdown code fences, ``>`` quote lines, ``<think>`` blocks and inline quotes ("...", “...”)
  is removed first, so a judge that echoes a next state saying "output \\boxed{1}" does not cast
  that vote. No final-answer line means no valid vote (score None), never a guess.
- ``v`` may be ``1``, ``+1``, ``-1`` (also the unicode minus), ``0`` and their ``.0`` forms, with
  spaces around; anything else (``2``, ``0.5``, ``yes``) is not a vote.
- Majority: the most common valid score; a tie at the top or no valid vote gives 0.

Knows nothing about HTTP, Kafka or prompts beyond the fence markers it strips.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

FINAL_MARKER = "Final answer:"

_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")
_FINAL_LINE = re.compile(r"final\s+answer\s*[:：]\s*(.*)$", re.IGNORECASE)
_DATA_FENCE = re.compile(r"<<<DATA-(\w+).*?DATA-\1>>>", re.DOTALL)
_OPEN_DATA_FENCE = re.compile(r"<<<DATA-\w+.*", re.DOTALL)  # unterminated: drop the rest
_CODE_FENCE = re.compile(r"```.*?(```|$)", re.DOTALL)
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_INLINE_QUOTES = re.compile(r"\"[^\"\n]*\"|“[^”\n]*”|«[^»\n]*»")
_HINT = re.compile(r"\[HINT_START\](.*?)\[HINT_END\]", re.DOTALL)
_VALUES = {"1": 1, "+1": 1, "1.0": 1, "+1.0": 1, "-1": -1, "-1.0": -1, "0": 0, "+0": 0,
           "-0": 0, "0.0": 0}


def strip_quoted(text: str) -> str:
    """The judge's own words: data fences, code fences, quote lines, reasoning, inline quotes removed."""
    text = _THINK.sub("", text)
    text = _DATA_FENCE.sub("", text)
    text = _OPEN_DATA_FENCE.sub("", text)
    text = _CODE_FENCE.sub("", text)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith(">")]
    return _INLINE_QUOTES.sub("", "\n".join(lines))


def parse_value(raw: str) -> int | None:
    """+1 / -1 / 0 from the inside of a ``\\boxed{}``; None if it is none of them."""
    value = raw.strip().replace("−", "-").replace(" ", "")
    return _VALUES.get(value)


def parse_final_answer(text: str) -> tuple[int | None, str | None]:
    """(score, why-not) from a judge's raw output; score None when there is no valid vote."""
    own = strip_quoted(text)
    lines = [line.strip() for line in own.splitlines() if line.strip()]
    if not lines:
        return None, "empty answer after removing quoted text"
    match = _FINAL_LINE.search(lines[-1])
    if match is None:
        return None, f"last line is not a final answer: {lines[-1][:80]!r}"
    boxed = _BOXED.findall(match.group(1))
    if not boxed:
        return None, f"final answer has no \\boxed{{}}: {lines[-1][:80]!r}"
    score = parse_value(boxed[-1])
    if score is None:
        return None, f"\\boxed{{{boxed[-1]}}} is not one of +1, -1, 0"
    return score, None


def parse_hint(text: str) -> str | None:
    """The last ``[HINT_START]...[HINT_END]`` span in the judge's own words, stripped."""
    found = _HINT.findall(strip_quoted(text))
    return found[-1].strip() if found else None


def majority(scores: Iterable[int | None]) -> int:
    """The most common valid score; ties at the top and no valid votes give 0."""
    counts = Counter(s for s in scores if s in (-1, 0, 1))
    if not counts:
        return 0
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return 0
    return ranked[0][0]


def vote_mean(scores: Iterable[int | None]) -> float:
    """The process reward of a step: the mean of the valid ±1 votes (0 votes and unreadable
    ones are not counted); 0.0 when none is valid."""
    valid = [s for s in scores if s in (-1, 1)]
    return sum(valid) / len(valid) if valid else 0.0
