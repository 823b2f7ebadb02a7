"""Event serializers bound to the schema registry, in the Confluent wire format.

Serialization goes through ``confluent_kafka.schema_registry``'s Avro serializer (fastavro
underneath): magic byte 0, a 4-byte schema id, then the Avro body. Decoding reads that framing
itself and hands the body to fastavro with the writer's schema, fetched once per id (the
client's deserializer re-expands the reader schema on every record: 82 µs a turn, 34 µs this
way). Subjects follow the topic name strategy (``<topic>-value``) and are registered with
BACKWARD compatibility, so a reader with the newest schema reads every older version's data.

Decoding failures raise ``DecodeError`` naming the topic, partition, offset and cause.
This module knows nothing about producing or consuming.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro import parse_schema, schemaless_reader

from schemas.catalog import NAMESPACE, EventSchema, events_on, schema_for, shares_topic
from schemas.errors import DecodeError, SchemaError
from schemas.events import EVENT_TYPES, Event

# Subjects are `<topic>-value`, said outright: the client's default ("associated" names)
# asks the registry about every new topic first, an extra round trip that Apicurio answers 404.
# A topic that carries several events (``episodes``) has a subject per event,
# `<topic>-<full record name>`, so each evolves on its own under BACKWARD compatibility.
_TOPIC_SUBJECTS = {"subject.name.strategy.type": "TOPIC"}
_TOPIC_RECORD_SUBJECTS = {"subject.name.strategy.type": "TOPIC_RECORD"}


class RegistryConfig(Protocol):
    """What a registry client needs (infra.settings.RegistrySettings is one)."""

    def client_config(self) -> dict[str, Any]: ...


def registry_client(registry: RegistryConfig) -> SchemaRegistryClient:
    return SchemaRegistryClient(registry.client_config())


def subject_for(topic: str, event_name: str | None = None) -> str:
    """`<topic>-value`, or `<topic>-<full record name>` for an event that shares its topic."""
    if event_name is not None and shares_topic(event_name):
        return f"{topic}-{NAMESPACE}.{event_name}"
    return f"{topic}-value"


def register(client: SchemaRegistryClient, topic: str, schema: EventSchema | str,
             compatibility: str = "BACKWARD", event_name: str | None = None) -> int:
    """Register `schema` under its subject (subject_for) with the given compatibility; its id."""
    schema_str = schema if isinstance(schema, str) else schema.schema_str()
    subject = subject_for(topic, event_name or (schema.name if isinstance(schema, EventSchema) else None))
    try:
        client.set_compatibility(subject_name=subject, level=compatibility)
        return client.register_schema(subject, Schema(schema_str, "AVRO"))
    except Exception as exc:
        raise SchemaError(f"registry refused schema for subject {subject!r}: {exc}") from exc


@dataclass
class EventSerde:
    """Serializer and deserializer of one event type on one topic."""

    client: SchemaRegistryClient
    event_name: str
    topic: str
    schema_str: str | None = None  # override, for evolution tests; default: the catalog's
    _ser: AvroSerializer = field(init=False, repr=False)
    _writers: dict[int, tuple[Any, Any]] = field(init=False, repr=False)   # schema id -> (writer, reader)

    def __post_init__(self) -> None:
        model = EVENT_TYPES[self.event_name]
        schema_str = self.schema_str or schema_for(self.event_name).schema_str()
        self._model = model
        subjects = _TOPIC_RECORD_SUBJECTS if shares_topic(self.event_name) else _TOPIC_SUBJECTS
        self._ser = AvroSerializer(
            self.client,
            schema_str,
            to_dict=lambda obj, ctx: obj if isinstance(obj, dict) else obj.to_avro(),
            conf={"auto.register.schemas": True, **subjects},
        )
        self._reader = parse_schema(json.loads(schema_str))
        self._reader_form = _canonical(schema_str)
        self._writers = {}
        self._ctx = SerializationContext(self.topic, MessageField.VALUE)

    def serialize(self, event: Event | dict[str, Any]) -> bytes:
        try:
            return self._ser(event, self._ctx)
        except Exception as exc:
            name = type(event).__name__
            raise SchemaError(
                f"cannot serialize {name} for topic {self.topic!r}: {exc}"
            ) from exc

    def deserialize_dict(self, data: bytes | None, partition: int = -1,
                         offset: int = -1) -> dict[str, Any]:
        if data is None:
            raise DecodeError(self.topic, partition, offset, "record has no value (tombstone)")
        if len(data) < 5 or data[0] != 0:
            raise DecodeError(self.topic, partition, offset,
                              "not in the Confluent wire format (no magic byte 0 and schema id)")
        schema_id = int.from_bytes(data[1:5], "big")
        try:
            writer, reader = self._writers.get(schema_id) or self._writer(schema_id)
            return schemaless_reader(io.BytesIO(data[5:]), writer, reader)
        except Exception as exc:
            raise DecodeError(self.topic, partition, offset, f"{type(exc).__name__}: {exc}") from exc

    def _writer(self, schema_id: int) -> tuple[Any, Any]:
        """The writer's schema of an id (the registry's answer, asked once), and the reader's
        where the two differ: fastavro resolves them then, and reads the writer's alone else."""
        schema_str = self.client.get_schema(schema_id).schema_str
        same = _canonical(schema_str) == self._reader_form
        pair = (self._reader, None) if same else (parse_schema(json.loads(schema_str)), self._reader)
        self._writers[schema_id] = pair
        return pair

    def deserialize(self, data: bytes | None, partition: int = -1, offset: int = -1) -> Event:
        record = self.deserialize_dict(data, partition, offset)
        try:
            return self._model.from_avro(record)
        except Exception as exc:
            raise DecodeError(
                self.topic, partition, offset,
                f"decoded record does not fit {self.event_name}: {exc}",
            ) from exc


def _canonical(schema_str: str) -> str:
    return json.dumps(json.loads(schema_str), sort_keys=True, separators=(",", ":"))


class TopicSerde:
    """Decodes whatever event a topic carries. On a topic of one event this is that event's
    serde; on a shared topic the writer's schema id (bytes 1-4 of the Confluent framing) says
    which event a record is, looked up once per id in the registry."""

    def __init__(self, client: SchemaRegistryClient, topic: str, short_topic: str) -> None:
        self.topic = topic
        self.serdes = {name: EventSerde(client, name, topic) for name in events_on(short_topic)}
        self.client = client
        self._by_id: dict[int, str] = {}

    def event_name(self, data: bytes | None, partition: int = -1, offset: int = -1) -> str:
        if len(self.serdes) == 1:
            return next(iter(self.serdes))
        if not data or len(data) < 5 or data[0] != 0:
            raise DecodeError(self.topic, partition, offset, "not in the Confluent wire format")
        schema_id = int.from_bytes(data[1:5], "big")
        name = self._by_id.get(schema_id)
        if name is None:
            try:
                writer = json.loads(self.client.get_schema(schema_id).schema_str)
            except Exception as exc:
                raise DecodeError(self.topic, partition, offset, f"schema id {schema_id}: {exc}") from exc
            name = writer.get("name", "").rsplit(".", 1)[-1] if isinstance(writer, dict) else ""
            if name not in self.serdes:
                raise DecodeError(self.topic, partition, offset,
                                  f"schema id {schema_id} is a {name or 'non-record'}, not one of {sorted(self.serdes)}")
            self._by_id[schema_id] = name
        return name

    def deserialize(self, data: bytes | None, partition: int = -1, offset: int = -1) -> Event:
        if data is None:
            raise DecodeError(self.topic, partition, offset, "record has no value (tombstone)")
        return self.serdes[self.event_name(data, partition, offset)].deserialize(data, partition, offset)
