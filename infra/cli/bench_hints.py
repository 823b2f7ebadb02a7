"""`nextstate bench hints`: how much of a preference the hint-conditioned base model meets,
for each place the teacher can read the hint.

OPD distils the base model conditioned on the user's correction, so what that teacher does with
the hint bounds what OPD can learn (`bench personal` calls it the ceiling). Where the hint sits
in the teacher's context changes it: this measures each `processors.hint_placement` on the 16
held-out probe questions of `producers.simulated.personas`, with every one of a preference's
correction wordings as the hint, greedy, on the local engine loaded with the served model (the
teacher's engine when `processors.teacher_model=served`) and the renderer the teacher uses
(`serving.chat.with_hint`). The base model's rate without a hint is printed beside them.

Beside each rate, how sure the teacher is: the entropy of its next-token distribution on the
K + 1 bins the learner's teacher term sees (its top `processors.teacher_top_k` tokens and the
rest as one bin, `learner.losses`), along the base model's own greedy answers, at the first
token and averaged over the later ones, against the base model's without the hint. A teacher
flatter than the base spreads out a policy that a forward KL pulls towards it
(`learner.loss.opd_temperature`).

No Kafka, no gateway: a loaded engine and the probes. About 2 minutes a preference on two cores
with the embedded model.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

from producers.simulated.personas import PERSONAS, Persona, split_questions
from schemas.events import SamplingParams
from serving.chat import PLACEMENTS, render_prompt, with_hint

MAX_NEW_TOKENS = 96   # as bench personal's probes


def _prompt(tokenizer: Any, question: str, hint: str | None, placement: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if hint is not None:
        messages = with_hint(messages, hint, placement)
    return render_prompt(tokenizer, messages, None)


async def _rate(engine: Any, tokenizer: Any, questions: list[str], persona: Persona, hint: str | None = None,
                placement: str = "before") -> tuple[float, list[list[int]]]:
    """Share of the questions whose greedy answer satisfies the persona, with the hint if one is
    given, and the answers' token ids."""
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)

    async def answer(q: str) -> tuple[bool, list[int]]:
        gen = await engine.generate(_prompt(tokenizer, q, hint, placement), params)
        return (persona.satisfied_by(q, tokenizer.decode(gen.token_ids, skip_special_tokens=True),
                                     gen.finish_reason != "length"), list(gen.token_ids))

    done = await asyncio.gather(*(answer(q) for q in questions))
    return sum(ok for ok, _ in done) / len(done), [ids for _, ids in done]


def bins_entropy(top_logprobs: list[float]) -> float:
    """Entropy (nats) of a top-K distribution with the rest of the vocabulary as one more bin."""
    probs = [math.exp(lp) for lp in top_logprobs]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in probs + [rest] if p > 0)


async def _spread(engine: Any, tokenizer: Any, questions: list[str], answers: list[list[int]], top_k: int,
                  hint: str | None = None, placement: str = "before") -> dict[str, float]:
    """Mean bin entropy of the base model's next-token distribution along `answers`, under the
    question alone or with the hint: at the first token, and over the later ones."""
    first: list[float] = []
    later: list[float] = []
    for q, ids in zip(questions, answers):
        if not ids:
            continue
        scores = await engine.score(_prompt(tokenizer, q, hint, placement), ids, top_k=top_k, base=True)
        h = [bins_entropy(row) for row in scores.top_logprobs or []]
        first += h[:1]
        later += h[1:]
    return {"first": sum(first) / max(len(first), 1), "later": sum(later) / max(len(later), 1)}


async def measure(engine: Any, tokenizer: Any, preferences: list[str], placements: list[str],
                  top_k: int = 16) -> list[dict[str, Any]]:
    _, questions = split_questions()
    rows = []
    for name in preferences:
        persona = PERSONAS[name]
        base, answers = await _rate(engine, tokenizer, questions, persona)
        row: dict[str, Any] = {"preference": name, "base": base, "placements": {}}
        if top_k:
            row["entropy"] = await _spread(engine, tokenizer, questions, answers, top_k)
        for placement in placements:
            rates = [(await _rate(engine, tokenizer, questions, persona, hint, placement))[0]
                     for hint in persona.corrections]
            row["placements"][placement] = {"per_wording": rates, "mean": sum(rates) / len(rates)}
            if top_k:
                spreads = [await _spread(engine, tokenizer, questions, answers, top_k, hint, placement)
                           for hint in persona.corrections]
                row["placements"][placement]["entropy"] = {
                    where: sum(sp[where] for sp in spreads) / len(spreads) for where in ("first", "later")}
        rows.append(row)
    return rows


def _table(title: str, placement_columns: list[str], rows: list[tuple[str, str, list[str]]]) -> Any:
    """A table of one row per preference: its name, the base model's cell, one cell per placement."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("preference")
    table.add_column("base", justify="right")
    for column in placement_columns:
        table.add_column(column, justify="right")
    for name, base, cells in rows:
        table.add_row(name, base, *cells)
    return table


def run_hints_bench(settings: Any, preferences: list[str], placements: list[str], out: Path | None,
                    console: Any) -> list[dict[str, Any]]:
    from infra.errors import ConfigError
    from serving import create_engine

    unknown = [p for p in preferences if p not in PERSONAS] + [p for p in placements if p not in PLACEMENTS]
    if unknown:
        raise ConfigError(f"unknown preference or placement {unknown}; preferences: {sorted(PERSONAS)}, "
                          f"placements: {list(PLACEMENTS)}")
    serving = settings.serving.model_copy(update={"engine": "local"})
    engine = create_engine(serving)

    async def go() -> list[dict[str, Any]]:
        try:
            return await measure(engine, engine.tokenizer, preferences, placements,
                                 settings.processors.teacher_top_k)
        finally:
            await engine.close()

    started = time.monotonic()
    rows = asyncio.run(go())
    console.print(_table(
        f"hint-conditioned base, greedy, {len(split_questions()[1])} probes × each correction wording "
        f"({engine.info().model})",
        [f"hint {p}: per wording → mean" for p in placements],
        [(row["preference"], f"{row['base']:.2f}",
          [f"{' '.join(f'{r:.2f}' for r in row['placements'][p]['per_wording'])} → "
           f"{row['placements'][p]['mean']:.2f}" for p in placements]) for row in rows]))
    if any("entropy" in row for row in rows):
        def pair(spread: dict[str, float]) -> str:
            return f"{spread['first']:.2f} / {spread['later']:.2f}"

        console.print(_table(
            f"entropy (nats) of the next token on the teacher term's {settings.processors.teacher_top_k} + 1 "
            f"bins, along the base model's greedy answers: first token / later tokens",
            [f"hinted, hint {p}" for p in placements],
            [(row["preference"], pair(row["entropy"]), [pair(row["placements"][p]["entropy"]) for p in placements])
             for row in rows]))
    console.print(f"{time.monotonic() - started:.0f}s; the teacher reads the hint "
                  f"{settings.processors.hint_placement} the message (processors.hint_placement)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {out}")
    return rows
