"""`nextstate bench hints`: how much of a preference the hint-conditioned base model meets,
for each place the teacher can read the hint.

OPD distils the base model conditioned on the user's correction, so what that teacher does with
the hint bounds what OPD can learn (`bench personal` calls it the ceiling). Where the hint sits
in the teacher's context changes it: this measures each `processors.hint_placement` on the 16
held-out probe questions of `producers.simulated.personas`, with every one of a preference's
correction wordings as the hint, greedy, on the local engine loaded with the served model (the
teacher's engine when `processors.teacher_model=served`) and the renderer the teacher uses
(`serving.chat.with_hint`). The base model's rate without a hint is printed beside them.

No Kafka, no gateway: a loaded engine and the probes. About 2 minutes a preference on two cores
with the embedded model.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from producers.simulated.personas import PERSONAS, Persona, split_questions
from schemas.events import SamplingParams
from serving.chat import PLACEMENTS, render_prompt, with_hint

MAX_NEW_TOKENS = 96   # as bench personal's probes


async def _rate(engine: Any, tokenizer: Any, questions: list[str], persona: Persona, hint: str | None = None,
                placement: str = "before") -> float:
    """Share of the questions whose greedy answer satisfies the persona, with the hint if one is
    given."""
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)

    async def satisfied(q: str) -> bool:
        messages = [{"role": "user", "content": q}]
        if hint is not None:
            messages = with_hint(messages, hint, placement)
        gen = await engine.generate(render_prompt(tokenizer, messages, None), params)
        return persona.satisfied_by(tokenizer.decode(gen.token_ids, skip_special_tokens=True),
                                    gen.finish_reason != "length")

    verdicts = await asyncio.gather(*(satisfied(q) for q in questions))
    return sum(verdicts) / len(verdicts)


async def measure(engine: Any, tokenizer: Any, preferences: list[str],
                  placements: list[str]) -> list[dict[str, Any]]:
    _, questions = split_questions()
    rows = []
    for name in preferences:
        persona = PERSONAS[name]
        base = await _rate(engine, tokenizer, questions, persona)
        row: dict[str, Any] = {"preference": name, "base": base, "placements": {}}
        for placement in placements:
            rates = [await _rate(engine, tokenizer, questions, persona, hint, placement)
                     for hint in persona.corrections]
            row["placements"][placement] = {"per_wording": rates, "mean": sum(rates) / len(rates)}
        rows.append(row)
    return rows


def run_hints_bench(settings: Any, preferences: list[str], placements: list[str], out: Path | None,
                    console: Any) -> list[dict[str, Any]]:
    from rich.table import Table

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
            return await measure(engine, engine.tokenizer, preferences, placements)
        finally:
            await engine.close()

    started = time.monotonic()
    rows = asyncio.run(go())
    table = Table(title=f"hint-conditioned base, greedy, {len(split_questions()[1])} probes × each correction "
                        f"wording ({engine.info().model})")
    table.add_column("preference")
    table.add_column("base", justify="right")
    for placement in placements:
        table.add_column(f"hint {placement}: per wording → mean", justify="right")
    for row in rows:
        cells = [f"{' '.join(f'{r:.2f}' for r in row['placements'][p]['per_wording'])} → "
                 f"{row['placements'][p]['mean']:.2f}" for p in placements]
        table.add_row(row["preference"], f"{row['base']:.2f}", *cells)
    console.print(table)
    console.print(f"{time.monotonic() - started:.0f}s; the teacher reads the hint "
                  f"{settings.processors.hint_placement} the message (processors.hint_placement)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {out}")
    return rows
