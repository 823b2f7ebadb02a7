"""Each typed model against its .avsc: same fields in the same order, same types, same
nullability and defaults, same enum symbols. Pure: no Kafka."""

from __future__ import annotations

import io
import types
import typing
from datetime import datetime
from enum import StrEnum

import fastavro
import pytest
from pydantic import BaseModel

from schemas.catalog import TOPICS, catalog, schema_for
from schemas.events import EVENT_TYPES

PRIMITIVE = {"string": str, "int": int, "long": int, "double": float, "float": float,
             "boolean": bool, "bytes": bytes}
PACKED = {"int32-le-array": list[int], "uint8-array": list[int], "float32-le-array": list[float]}


def _strip(annotation):
    """Unwrap Annotated[...] to the plain type."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _check(avro, annotation, where: str) -> None:
    annotation = _strip(annotation)
    if isinstance(avro, list):  # union: only ["null", X] is used
        assert avro[0] == "null" and len(avro) == 2, f"{where}: unexpected union {avro}"
        args = typing.get_args(annotation)
        assert type(None) in args, f"{where}: avro is nullable, model is not ({annotation})"
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1, f"{where}: {annotation}"
        return _check(avro[1], rest[0], where)
    assert not (isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union), \
        f"{where}: model is optional but avro is not"
    if isinstance(avro, str):
        if avro in PRIMITIVE:
            assert annotation is PRIMITIVE[avro], f"{where}: avro {avro} vs model {annotation}"
            return
        named = _named[avro.rsplit(".", 1)[-1]]
        return _check(named, annotation, where)
    kind = avro["type"]
    logical = avro.get("logicalType")
    if logical in PACKED:
        assert annotation == PACKED[logical], f"{where}: {logical} vs {annotation}"
    elif logical == "uuid":
        assert annotation is str, where
    elif logical == "timestamp-millis":
        assert annotation is datetime, where
    elif kind == "array":
        assert typing.get_origin(annotation) is list, f"{where}: array vs {annotation}"
        _check(avro["items"], typing.get_args(annotation)[0], where + "[]")
    elif kind == "map":
        assert typing.get_origin(annotation) is dict, f"{where}: map vs {annotation}"
        _check(avro["values"], typing.get_args(annotation)[1], where + "{}")
    elif kind == "enum":
        assert issubclass(annotation, StrEnum), f"{where}: enum vs {annotation}"
        assert [m.value for m in annotation] == avro["symbols"], f"{where}: enum symbols differ"
        _named[avro["name"]] = avro
    elif kind == "record":
        assert issubclass(annotation, BaseModel), f"{where}: record vs {annotation}"
        _named[avro["name"]] = avro
        _check_record(avro, annotation, where)
    elif kind in PRIMITIVE:
        _check(kind, annotation, where)
    else:
        raise AssertionError(f"{where}: unhandled avro type {avro}")


_named: dict[str, typing.Any] = {}


def _check_record(avro, model, where: str) -> None:
    fields = model.model_fields
    assert list(fields) == [f["name"] for f in avro["fields"]], \
        f"{where}: field names/order differ: {list(fields)} vs {[f['name'] for f in avro['fields']]}"
    for f in avro["fields"]:
        info = fields[f["name"]]
        _check(f["type"], info.annotation, f"{where}.{f['name']}")
        has_model_default = not info.is_required()
        if "default" in f:
            assert has_model_default, f"{where}.{f['name']}: avro has a default, model requires it"
            if info.default_factory is None and not isinstance(info.default, (list, dict)):
                assert info.default == f["default"] or (info.default is None and f["default"] is None), \
                    f"{where}.{f['name']}: default {info.default!r} vs avro {f['default']!r}"


@pytest.mark.parametrize("name", list(TOPICS))
def test_model_matches_schema(name):
    _named.clear()
    _check_record(schema_for(name).expanded, EVENT_TYPES[name], name)


def test_every_event_has_a_model_and_a_topic():
    assert set(catalog()) == set(EVENT_TYPES) == set(TOPICS)
    for name, schema in catalog().items():
        names = [f["name"] for f in schema.expanded["fields"]]
        assert names[:4] == ["event_id", "occurred_at", "schema_version", "parent_ids"], name


def test_packed_fields_document_their_layout():
    """A consumer in another language must be able to decode from the schema alone."""
    found = 0
    for name, schema in catalog().items():
        for f in schema.expanded["fields"]:
            t = f["type"]
            for branch in (t if isinstance(t, list) else [t]):
                if isinstance(branch, dict) and branch.get("logicalType") in PACKED:
                    found += 1
                    doc = f.get("doc", "")
                    if branch["logicalType"] != "uint8-array":
                        assert "little-endian" in doc, f"{name}.{f['name']} does not document its byte order"
                    else:
                        assert "byte" in doc, f"{name}.{f['name']} does not document its layout"
    assert found >= 8


def test_plain_avro_reader_sees_documented_bytes():
    """A reader that knows nothing of our logical types gets bytes it can decode by the doc."""
    import struct

    from infra.bench_codec import sample_turn

    turn = sample_turn(3, 4)
    schema = schema_for("TurnRecorded")
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema.parsed, turn.to_avro())
    # Parse the same schema with the logical types stripped, as a foreign reader would.
    import json
    plain = json.loads(json.dumps(schema.expanded).replace('"logicalType": "int32-le-array"', '"x": 1')
                       .replace('"logicalType": "float32-le-array"', '"x": 2'))
    record = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), fastavro.parse_schema(plain))
    raw = record["response_token_ids"]
    assert isinstance(raw, bytes)
    assert list(struct.unpack(f"<{len(raw) // 4}i", raw)) == turn.response_token_ids
    lp = record["response_logprobs"]
    assert list(struct.unpack(f"<{len(lp) // 4}f", lp)) == turn.response_logprobs
