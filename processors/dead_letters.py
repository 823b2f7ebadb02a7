"""What makes a record unusable, and the DeadLettered event that records it.

Validators raise ``InvalidRecord`` naming the values they saw: a turn whose response has
512 token ids but 511 logprobs, a transition whose turn does, a sample whose lengths differ.
The faust wiring (processors.app) catches ``InvalidRecord`` and ``DecodeError`` for one
record, sends a ``DeadLettered`` with the source topic/partition/offset, the raw key and
value, and the error, and goes on with the next record. Knows nothing about faust.
"""

from __future__ import annotations

import json

from infra.errors import ProcessorError
from schemas.events import DeadLettered, SampleReady, TransitionFormed, TurnRecorded


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
    problem = sample.problem()
    if problem:
        raise InvalidRecord(problem)


def dead_lettered(stage: str, topic: str, partition: int, offset: int, key: bytes | None,
                  value: bytes | None, exc: BaseException,
                  headers: dict[str, bytes] | None = None) -> DeadLettered:
    """The DeadLettered event for one bad record (DeadLettered.of)."""
    return DeadLettered.of(stage, topic, partition, offset, key, value, exc, headers)
