"""The stage graph, declared once: every stage of the processors, in the order data flows.

Each stage module exports one ``STAGE`` (processors.stage.Stage: its input and output events,
its state table, its handler, its timer); this tuple collects them. The faust wiring
(processors.app), `nextstate process <stage>`, replay (processors.replay), the provisioning of
control topics and `nextstate topology` all read it. Adding a stage is one module with its
``STAGE`` plus one entry here.

Stages talk only through topics (schemas.catalog), so the order below is for
people; each stage is its own consumer group. Faust-free and Kafka-free.
"""

from __future__ import annotations

from processors import assemble, group, hint, judge, sessionize
from processors.stage import Stage

STAGES: tuple[Stage, ...] = (
    sessionize.STAGE,
    judge.STAGE,
    hint.STAGE,
    assemble.STAGE,
    group.STAGE,
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"no stage named {name!r}; known: {', '.join(BY_NAME)}") from None


def control_topic(namespace: str, stage_name: str) -> str:
    """The raw topic a stage's timer sends its requests on (a stage with a timer has one)."""
    return f"{namespace}processors-{stage_name}-control"


def control_topics(namespace: str) -> list[str]:
    return [control_topic(namespace, s.name) for s in STAGES if s.timer is not None]


def describe() -> list[tuple[str, str, str, str]]:
    """(stage, reads, writes, notes) rows for the docs and `nextstate topology`."""
    from schemas.catalog import TOPICS

    rows = []
    for s in STAGES:
        notes = [s.summary]
        if s.table:
            notes.append(f"table: {s.table}")
        if s.timer:
            notes.append("timer + control topic")
        rows.append((s.name, " + ".join(TOPICS[e] for e in s.inputs), " + ".join(TOPICS[e] for e in s.outputs),
                     "; ".join(notes)))
    return rows
