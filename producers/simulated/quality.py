"""Whether answers stay answers while a policy learns a preference.

A policy that learns "be brief" can get there by saying nothing ("The answer is not
available.") or by looping one sentence until the token limit; the satisfaction rate alone
would call both a success. These measures catch that on a set of answers to the same probe
questions:

- `distinct_bigram_share`: distinct word bigrams over all word bigrams of the set (repetition
  within and across answers lowers it; compare with the base model's share on the same probes);
- `max_sentence_repeats`: the most times one sentence occurs in one answer (LOOP_REPEATS or
  more is a loop: `loops`; the simulated users reject such an answer too);
- the base model's mean per-token logprob of the answers (computed by the benchmark with the
  base weights): how far from ordinary language the answers drifted.

Pure: no model, no HTTP.
"""

from __future__ import annotations

import re
from collections import Counter

LOOP_REPEATS = 3   # one sentence this often in one answer is a loop
_WORD = re.compile(r"[\w']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_bigram_share(answers: list[str]) -> float:
    """Distinct word bigrams / all word bigrams over the answers (1.0 when there are none)."""
    seen: set[tuple[str, str]] = set()
    total = 0
    for answer in answers:
        w = _words(answer)
        pairs = list(zip(w, w[1:]))
        total += len(pairs)
        seen.update(pairs)
    return len(seen) / total if total else 1.0


def sentences(text: str) -> list[str]:
    out = []
    for part in _SENTENCE_END.split(text):
        norm = " ".join(_words(part))
        if norm:
            out.append(norm)
    return out


def max_sentence_repeats(answer: str) -> int:
    """How often the most repeated sentence (case and punctuation ignored) occurs in the answer."""
    counts = Counter(sentences(answer))
    return max(counts.values(), default=0)


def loops(answer: str) -> bool:
    """Whether the answer says one sentence LOOP_REPEATS times or more."""
    return max_sentence_repeats(answer) >= LOOP_REPEATS


def looping(answers: list[str]) -> int:
    """How many of the answers loop."""
    return sum(map(loops, answers))


def empty_share(answers: list[str], min_words: int = 3) -> float:
    """Share of answers with fewer than `min_words` words (a non-answer)."""
    return sum(len(_words(a)) < min_words for a in answers) / len(answers) if answers else 0.0
