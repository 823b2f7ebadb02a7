"""`nextstate bench teacher`: where in the policy's answers the hinted teacher disagrees with it.

OPD and the teacher half of `combined` move the policy token by token, by the hinted teacher's
logprob of each token the policy sampled against the policy's own (and, with top-K rows, by
the teacher's distribution there). A preference the hinted base meets as a whole can still give
no token-level signal where the policy goes wrong: the teacher may avoid a contraction by taking
another path early, yet, once the policy has written "It", continue "'s" as surely as the policy
did. This reads a namespace's samples from the log, decodes each trained token of the samples
that carry teacher logprobs, and compares the teacher − behaviour logprob gap at the tokens
whose text matches `pattern` (the ones the user objects to: "'s", "'t", "!") with the gap at
every token, and how often the teacher's most likely token is another one there and overall.
A gap at the matched tokens no larger than elsewhere means the teacher term has nothing
particular to say about them; the reward term alone can push them down.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from infra.errors import ConfigError
from infra.settings import Settings
from schemas.events import SampleReady


@dataclass(frozen=True)
class Gaps:
    """Teacher − behaviour logprob gaps (nats) of one set of tokens; `other_top` counts the
    tokens whose teacher top-1 is another token, of `with_top` that carry top-K rows."""

    tokens: int
    mean: float | None
    median: float | None
    below: float | None        # the share of them the teacher finds less likely than the policy did
    other_top: int
    with_top: int


def _gaps(rows: Sequence[tuple[float, bool | None]]) -> Gaps:
    """`rows`: (gap, whether the teacher's top-1 is another token; None without top-K rows)."""
    if not rows:
        return Gaps(0, None, None, None, 0, 0)
    tops = [other for _, other in rows if other is not None]
    values = [gap for gap, _ in rows]
    return Gaps(len(values), statistics.fmean(values), statistics.median(values),
                sum(v < 0 for v in values) / len(values), sum(tops), len(tops))


def teacher_gaps(samples: Sequence[SampleReady], decode: Callable[[list[int]], str],
                 pattern: str) -> tuple[int, Gaps, Gaps]:
    """(samples read, the gaps at every trained token, the gaps at trained tokens whose decoded
    text matches `pattern` (re.search)) over the samples with teacher logprobs."""
    rx = re.compile(pattern)
    every: list[tuple[float, bool | None]] = []
    matched: list[tuple[float, bool | None]] = []
    used = 0
    for s in samples:
        if s.teacher_logprobs is None:
            continue
        used += 1
        k = s.teacher_top_k
        for i, token in enumerate(s.response_token_ids):
            if not s.loss_mask[i]:
                continue
            row = (s.teacher_logprobs[i] - s.behaviour_logprobs[i], s.teacher_top_ids[i * k] != token if k else None)
            every.append(row)
            if rx.search(decode([token])):
                matched.append(row)
    return used, _gaps(every), _gaps(matched)


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def gaps_table(namespace: str, pattern: str, every: Gaps, matched: Gaps) -> Table:
    table = Table(title=f"teacher − policy logprob at the trained tokens of {namespace}'s hinted samples")
    for name in ("tokens", "n", "mean gap", "median gap", "teacher less sure", "teacher's top-1 another token"):
        table.add_column(name, justify="left" if name == "tokens" else "right")
    for name, g in ((f"matching {pattern!r}", matched), ("every trained token", every)):
        share = f"{g.below:.0%}" if g.below is not None else "-"
        top = f"{g.other_top} of {g.with_top}" if g.with_top else "no top-K rows"
        table.add_row(name, str(g.tokens), _cell(g.mean), _cell(g.median), share, top)
    return table


def run_teacher_bench(settings: Settings, namespace: str, pattern: str, console: Console) -> tuple[Gaps, Gaps]:
    from transformers import AutoTokenizer

    from infra.eventlog import read_log
    from serving.models import resolve_model

    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--tokens {pattern!r} is not a regular expression: {exc}") from exc
    ns = namespace if namespace.endswith(".") else namespace + "."
    samples = [item.event for item in read_log(settings, ns, timeout=10.0) if isinstance(item.event, SampleReady)]
    if not samples:
        raise ConfigError(f"no samples in namespace {ns!r} (is the stack up, is the name right?)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.serving.model, settings.serving.cache_dir))
    used, every, matched = teacher_gaps(samples, lambda ids: tokenizer.decode(ids), pattern)
    console.print(gaps_table(ns, pattern, every, matched))
    console.print(f"{used} of {len(samples)} samples carry teacher logprobs; a gap is the hinted teacher's "
                  "logprob of the token the policy sampled minus the policy's own when it sampled it")
    return every, matched
