"""Schema evolution through the real registry and broker: a v2 of FeedbackReceived with a
new defaulted field; old and new writers and readers interoperate, and the registry refuses
a change that would break old data under BACKWARD compatibility."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka import Consumer

from infra.errors import SchemaError
from infra.kafka import EventProducer
from schemas.catalog import schema_for
from schemas.events import FeedbackReceived
from schemas.serde import EventSerde, register
from tests.conftest import poll_raw
from tests.schemas.examples import examples

pytestmark = pytest.mark.stack


def _v2(extra_field: dict) -> str:
    schema = json.loads(schema_for("FeedbackReceived").schema_str())
    schema["fields"].append(extra_field)
    return json.dumps(schema)


LOCALE = {"name": "locale", "type": "string", "default": "en",
          "doc": "language of the feedback text (added in v2)"}


def test_v1_and_v2_interoperate_through_registry_and_broker(settings, registry, namespace):
    topic = f"{namespace}feedback"
    v2 = _v2(LOCALE)
    v2_id = register(registry, topic, v2)
    versions = registry.get_versions(f"{topic}-value")
    assert len(versions) == 2  # v1 from provisioning, then v2

    v1_serde = EventSerde(registry, "FeedbackReceived", topic)
    v2_serde = EventSerde(registry, "FeedbackReceived", topic, schema_str=v2)
    old = examples("s-ev")["FeedbackReceived"]
    new_record = {**old.to_avro(), "event_id": str(uuid.uuid4()), "locale": "de"}

    producer = EventProducer(settings.kafka, registry, namespace)
    producer.send_raw(topic, v1_serde.serialize(old), key="s-ev")
    producer.send_raw(topic, v2_serde.serialize(new_record), key="s-ev")
    producer.flush()

    raw = Consumer({**settings.kafka.client_config(), "group.id": f"g-{uuid.uuid4().hex}",
                    "auto.offset.reset": "earliest"})
    raw.subscribe([topic])
    messages = poll_raw(raw, 2)
    raw.close()
    old_wire, new_wire = (m.value() for m in sorted(messages, key=lambda m: m.offset()))
    assert int.from_bytes(new_wire[1:5], "big") == v2_id != int.from_bytes(old_wire[1:5], "big")

    # New reader, old data: the new field takes its default.
    assert v2_serde.deserialize_dict(old_wire)["locale"] == "en"
    # New reader, new data.
    assert v2_serde.deserialize_dict(new_wire)["locale"] == "de"
    # Old reader (the typed model of v1), new data: the new field is dropped, the rest intact.
    decoded = v1_serde.deserialize(new_wire)
    assert isinstance(decoded, FeedbackReceived)
    assert decoded.event_id == new_record["event_id"] and decoded.text == old.text
    # Old reader, old data.
    assert v1_serde.deserialize(old_wire) == old


def test_registry_refuses_a_backward_incompatible_change(registry, namespace):
    topic = f"{namespace}feedback"
    required = {"name": "severity", "type": "int", "doc": "no default: old data cannot be read"}
    with pytest.raises(SchemaError) as err:
        register(registry, topic, _v2(required))
    assert "feedback-value" in str(err.value)
    assert len(registry.get_versions(f"{topic}-value")) == 1
