"""What makes a record unusable, and the DeadLettered event that records it.

Validators raise ``InvalidRecord`` naming the values they saw: a turn whose response has
512 token ids but 511 logprobs, a transition whose turn does, a sample whose lengths differ.
The faust wiring (processors.app) catches ``InvalidRecord`` and ``DecodeError`` for one
record, sends a ``DeadLettered`` with the source topic/partition/offset, the raw key and
value, and the error, and goes on with the next record. Knows nothing about faust.
"""

from __future__ import annotations

import json
import traceback

from infra.errors import ProcessorError
from schemas.events import DeadLettered, SampleReady, TransitionFormed, TurnRecorded, derived_id


class InvalidRecord(ProcessorError):
    """A record that decodes but cannot be used; goes to dead-letters with this message."""


def validate_turn(turn: TurnRecorded) -> None:
    what = f"turn {turn.event_id} (session {turn.session_id}, index {turn.turn_index})"
    if not turn.response_token_ids:
        raise InvalidRecord(f"{what} has no response tokens")
    if len(turn.response_token_ids) != len(turn.response_logprobs):
        raise InvalidRecord(f"{what} has {len(turn.response_token_ids)} response tokens but "
                            f"{len(turn.response_logprobs)} logprobs")
    if not turn.prompt_token_ids:
        raise InvalidRecord(f"{what} has no prompt tokens")
    try:
        messages = json.loads(turn.messages_json)
    except ValueError as exc:
        raise InvalidRecord(f"{what} messages_json is not JSON: {exc}") from exc
    if not isinstance(messages, list):
        raise InvalidRecord(f"{what} messages_json is a {type(messages).__name__}, not a list")


def validate_transition(transition: TransitionFormed) -> None:
    try:
        validate_turn(transition.turn)
    except InvalidRecord as exc:
        raise InvalidRecord(f"transition {transition.event_id}: {exc}") from exc


def validate_sample(sample: SampleReady) -> None:
    n = len(sample.response_token_ids)
    what = f"sample {sample.event_id} ({sample.method.value}, session {sample.session_id})"
    if n == 0:
        raise InvalidRecord(f"{what} has no response tokens")
    lengths = {"loss_mask": len(sample.loss_mask), "behaviour_logprobs": len(sample.behaviour_logprobs)}
    if sample.teacher_logprobs is not None:
        lengths["teacher_logprobs"] = len(sample.teacher_logprobs)
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise InvalidRecord(f"{what} has {n} response tokens but "
                            + ", ".join(f"{v} {k}" for k, v in bad.items()))
    if any(m not in (0, 1) for m in sample.loss_mask):
        raise InvalidRecord(f"{what} loss_mask holds values other than 0/1")


def dead_lettered(stage: str, topic: str, partition: int, offset: int, key: bytes | None,
                  value: bytes | None, exc: BaseException,
                  headers: dict[str, bytes] | None = None) -> DeadLettered:
    """The DeadLettered event for one bad record; its id is derived from where it sat."""
    return DeadLettered(
        event_id=derived_id("dead-letter", stage, topic, str(partition), str(offset)),
        stage=stage, source_topic=topic, source_partition=partition, source_offset=offset,
        key=key, value=value, headers=headers or {}, error_type=type(exc).__name__,
        error="".join(traceback.format_exception_only(exc)).strip(),
    )
