"""The event catalog: every ``.avsc`` under ``schemas/avro``, resolved and self-contained.

The ``.avsc`` files are the source of truth. An event may name another event's type
(``TransitionFormed`` embeds ``TurnRecorded``); for the registry every schema is expanded
so that it stands alone, with docs and logical types kept, because a consumer in another
language reads the layout of the packed token arrays from those docs.

This module knows schemas and topic names; it knows nothing about Kafka clients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro

from schemas import codecs  # noqa: F401  registers the packed-array logical types

AVRO_DIR = Path(__file__).resolve().parent / "avro"
NAMESPACE = "nextstate.events"

# event name -> topic (without the namespace prefix). The order is the dependency order:
# an event may only name types defined by events above it.
TOPICS: dict[str, str] = {
    "TurnRecorded": "turns",
    "FeedbackReceived": "feedback",
    "TransitionFormed": "transitions",
    "RewardJudged": "judgements",
    "HintJudged": "hints",
    "SampleReady": "samples",
    "CheckpointPublished": "checkpoints",
    "DeadLettered": "dead-letters",
    "TaskIssued": "tasks",
    "EpisodeStarted": "episodes",      # one topic, two events: a rollout's start and end stay in order
    "EpisodeEnded": "episodes",
}


@dataclass(frozen=True)
class EventSchema:
    name: str
    topic: str
    raw: dict[str, Any]
    expanded: dict[str, Any]
    parsed: Any

    @property
    def full_name(self) -> str:
        return f"{NAMESPACE}.{self.name}"

    def schema_str(self) -> str:
        return json.dumps(self.expanded, separators=(",", ":"))


def _load_raw(name: str, directory: Path = AVRO_DIR) -> dict[str, Any]:
    return json.loads((directory / f"{name}.avsc").read_text())


def _collect_named(schema: Any, namespace: str, out: dict[str, Any]) -> None:
    """Index every named type a raw schema defines, by full name."""
    if isinstance(schema, list):
        for branch in schema:
            _collect_named(branch, namespace, out)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind in ("record", "enum", "fixed"):
        ns = schema.get("namespace", namespace)
        full = schema["name"] if "." in schema["name"] else f"{ns}.{schema['name']}"
        out[full] = schema
        namespace = ns
    if kind == "record":
        for field in schema["fields"]:
            _collect_named(field["type"], namespace, out)
    elif kind == "array":
        _collect_named(schema["items"], namespace, out)
    elif kind == "map":
        _collect_named(schema["values"], namespace, out)
    elif isinstance(kind, (dict, list)):
        _collect_named(kind, namespace, out)


def expand(schema: Any, named: dict[str, Any], defined: set[str] | None = None,
           namespace: str = NAMESPACE) -> Any:
    """Inline each referenced named type at its first use; later uses stay references."""
    defined = set() if defined is None else defined
    if isinstance(schema, str):
        full = schema if "." in schema else f"{namespace}.{schema}"
        if full in named and full not in defined:
            return expand(named[full], named, defined, namespace)
        return schema
    if isinstance(schema, list):
        return [expand(branch, named, defined, namespace) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    kind = schema.get("type")
    if kind in ("record", "enum", "fixed"):
        ns = schema.get("namespace", namespace)
        full = schema["name"] if "." in schema["name"] else f"{ns}.{schema['name']}"
        defined.add(full)
        namespace = ns
        out["name"] = full.rsplit(".", 1)[1]
        out["namespace"] = full.rsplit(".", 1)[0]
    if kind == "record":
        out["fields"] = [
            {**field, "type": expand(field["type"], named, defined, namespace)}
            for field in schema["fields"]
        ]
    elif kind == "array":
        out["items"] = expand(schema["items"], named, defined, namespace)
    elif kind == "map":
        out["values"] = expand(schema["values"], named, defined, namespace)
    return out



def build_catalog(raws: dict[str, dict[str, Any]]) -> dict[str, EventSchema]:
    """Resolve raw event schemas (in dependency order) into self-contained ones."""
    named: dict[str, Any] = {}
    catalog: dict[str, EventSchema] = {}
    for name, raw in raws.items():
        _collect_named(raw, NAMESPACE, named)
        expanded = expand(raw, named)
        parsed = fastavro.parse_schema(expanded, _write_hint=False)
        catalog[name] = EventSchema(name, TOPICS.get(name, name), raw, expanded, parsed)
    return catalog


@cache
def catalog() -> dict[str, EventSchema]:
    return build_catalog({name: _load_raw(name) for name in TOPICS})


def schema_for(name: str) -> EventSchema:
    try:
        return catalog()[name]
    except KeyError as exc:
        raise KeyError(f"no event schema named {name!r}; known: {sorted(TOPICS)}") from exc


def events_on(short_topic: str) -> list[str]:
    """The events a topic carries (usually one; `episodes` carries a rollout's start and end)."""
    return [name for name, topic in TOPICS.items() if topic == short_topic]


def shares_topic(name: str) -> bool:
    return len(events_on(TOPICS[name])) > 1
