"""Whether answers stay answers while a policy learns a preference.

A policy that learns "be brief" can get there by saying nothing ("The answer is not
available.") or by looping one sentence until the token limit; the satisfaction rate alone
would call both a success. These measures catch that on a set of answers to the same probe
questions:

- `distinct_bigram_share`: distinct word bigrams over all word bigrams of the set (repetition
  within and across answers lowers it; compare with the base model's share on the same probes);
- `looping`: how many answers say one sentence three times or more (infra.repetition.loops, the
  one definition the simulated users, this benchmark and the learner's loop guard share);
- `unanswered`: the share of answers that do not answer their question (personas.answers, what
  the simulated users go by: an echo of the question, declining, talking around it);
- the base model's mean per-token logprob of the answers (computed by the benchmark with the
  base weights): how far from ordinary language the answers drifted.

Pure: no model, no HTTP.
"""

from __future__ import annotations

from infra.repetition import loops, words
from producers.simulated.personas import answers as answers_question


def distinct_bigram_share(answers: list[str]) -> float:
    """Distinct word bigrams / all word bigrams over the answers (1.0 when there are none)."""
    seen: set[tuple[str, str]] = set()
    total = 0
    for answer in answers:
        w = words(answer)
        pairs = list(zip(w, w[1:]))
        total += len(pairs)
        seen.update(pairs)
    return len(seen) / total if total else 1.0


def looping(answers: list[str]) -> int:
    """How many of the answers loop."""
    return sum(map(loops, answers))


def unanswered(questions: list[str], answers: list[str]) -> float:
    """Share of the answers (to `questions`, in order) that do not answer their question."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(answers)} answers to {len(questions)} questions")
    return sum(not answers_question(q, a) for q, a in zip(questions, answers)) / len(answers) if answers else 0.0
