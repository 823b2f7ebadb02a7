"""What counts as an answer that loops: one sentence said LOOP_REPEATS times or more.

One definition for the three parts that must agree on it: the simulated users reject such an
answer (producers.simulated.personas), the benchmark counts it against a run
(producers.simulated.quality, `nextstate bench personal`), and the learner's loop guard
pushes its repeats down (learner.loop_guard). A guard that looked only for repeated token
n-grams missed 15 of the 40 looping probe answers of five benchmark runs: lists whose
items differ by their number ("1. 1. 1. 2. 3. 4.", "2. Practice. 3. Practice. 4.
Practice.").

A sentence ends at `.`, `!` or `?` followed by white space, or at a line break; sentences are
compared by their words, lower-cased (case and punctuation ignored), so a list item's number
is a sentence of its own. Pure: the standard library only, no tokenizer.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

LOOP_REPEATS = 3   # one sentence this often in one answer is a loop
WORD = re.compile(r"[\w']+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased."""
    return WORD.findall(text.lower())


class Sentence(NamedTuple):
    start: int   # character offsets of the sentence's text in the answer, end exclusive
    end: int
    words: str   # its words, lower-cased, joined by single spaces


def sentence_spans(text: str) -> list[Sentence]:
    """The sentences of `text` that hold a word, in order, with where each stands."""
    out: list[Sentence] = []
    start = 0
    for cut in [*SENTENCE_END.finditer(text), None]:
        end = cut.start() if cut is not None else len(text)
        norm = " ".join(words(text[start:end]))
        if norm:
            out.append(Sentence(start, end, norm))
        if cut is not None:
            start = cut.end()
    return out


def sentences(text: str) -> list[str]:
    """The words of each sentence of `text` (see the module docstring)."""
    return [s.words for s in sentence_spans(text)]


def max_sentence_repeats(text: str) -> int:
    """How often the most repeated sentence occurs in `text`."""
    return max(Counter(sentences(text)).values(), default=0)


def loops(text: str) -> bool:
    """Whether `text` says one sentence LOOP_REPEATS times or more."""
    return max_sentence_repeats(text) >= LOOP_REPEATS


def repeated_sentences(text: str) -> list[Sentence]:
    """In a looping `text`, each occurrence after the first of a sentence said LOOP_REPEATS
    times or more (what a reader sees as the loop); [] when `text` does not loop."""
    spans = sentence_spans(text)
    counts = Counter(s.words for s in spans)
    seen: set[str] = set()
    out = []
    for s in spans:
        if counts[s.words] >= LOOP_REPEATS and s.words in seen:
            out.append(s)
        seen.add(s.words)
    return out
