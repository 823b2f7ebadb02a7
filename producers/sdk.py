"""The Python SDK: any agent runtime records turns and feedback straight to Kafka, no gateway.

A runtime that samples from its own engine hands over what the engine produced (prompt ids,
response ids, per-token logprobs) and the SDK records a TurnRecorded exactly as given; it
never tokenizes anything. Feedback (thumbs, outcome reward, tool/terminal/test output, user
message, session end) becomes FeedbackReceived with the same validation as the gateway's
`POST /v1/feedback`.

    with Recorder(load_settings(), tenant="acme") as rec:
        s = rec.session("run-17")
        s.turn(prompt_token_ids=p, response_token_ids=r, response_logprobs=lp, response_text=t)
        s.feedback("terminal_output", text=out, exit_code=0)
        s.end()

Delivery: by default events go to Kafka directly and `flush()` raises DeliveryError naming
what failed. With `spool_dir`, events are first fsync'd to a local spool and a background
thread drains it (the gateway's spool), so a Kafka outage loses nothing.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson

from infra.errors import GatewayError
from infra.settings import Settings
from producers.gateway.wire import FeedbackRequest
from schemas.events import EpisodeRef, Event, FeedbackReceived, SamplingParams, SessionSource, TurnRecorded, TurnType


class Recorder:
    def __init__(self, settings: Settings, tenant: str = "default", namespace: str | None = None,
                 spool_dir: Path | None = None, source: str = "sdk") -> None:
        from infra.kafka import EventProducer
        from schemas.serde import registry_client

        self.tenant, self.source = tenant, source
        self._spool = self._drainer = self._producer = None
        if spool_dir is not None:
            from producers.gateway.server import kafka_producer_factory
            from producers.gateway.spool import Spool, SpoolDrainer

            self._spool = Spool(Path(spool_dir), settings.gateway.spool_segment_bytes)
            self._drainer = SpoolDrainer(self._spool, kafka_producer_factory(settings, namespace),
                                         flush_timeout_s=settings.gateway.delivery_timeout_s + 5).start()
        else:
            self._producer = EventProducer(settings.kafka, registry_client(settings.registry), namespace)

    # -- recording ------------------------------------------------------------------------------
    def _emit(self, event: Event, key: str) -> None:
        if self._spool is not None:
            self._spool.append([(event, key)])
        else:
            self._producer.send(event, key=key)

    def record_turn(self, *, session_id: str, turn_index: int, prompt_token_ids: list[int],
                    response_token_ids: list[int], response_logprobs: list[float], response_text: str,
                    messages: list[dict[str, Any]] | None = None, tools: list[dict[str, Any]] | None = None,
                    turn_type: str | TurnType = TurnType.MAIN, finish_reason: str = "stop",
                    sampling: SamplingParams | dict[str, Any] | None = None, policy_version: int = 0,
                    engine: str = "external", model: str = "unknown", latency_ms: float = 0.0,
                    request_id: str | None = None, episode: EpisodeRef | dict[str, Any] | None = None) -> TurnRecorded:
        """Record one turn exactly as the runtime's engine produced it; `episode` names the
        rollout it is a step of (task id, group id, rollout index, environment)."""
        if len(response_token_ids) != len(response_logprobs):
            raise GatewayError(f"turn {session_id}#{turn_index} has {len(response_token_ids)} response "
                               f"tokens but {len(response_logprobs)} logprobs")
        if not prompt_token_ids:
            raise GatewayError(f"turn {session_id}#{turn_index} has no prompt token ids")
        bad = [t for t in (*prompt_token_ids, *response_token_ids) if not isinstance(t, int) or t < 0]
        if bad:
            raise GatewayError(f"turn {session_id}#{turn_index} has invalid token ids {bad[:5]}")
        event = TurnRecorded(
            tenant=self.tenant, session_id=session_id, session_source=SessionSource.BODY,
            turn_index=turn_index, turn_type=TurnType(str(turn_type).upper()),
            request_id=request_id or uuid.uuid4().hex,
            messages_json=orjson.dumps(messages or []).decode(),
            tools_json=orjson.dumps(tools).decode() if tools else None,
            prompt_token_ids=list(prompt_token_ids), response_token_ids=list(response_token_ids),
            response_logprobs=list(response_logprobs), response_text=response_text,
            finish_reason=finish_reason,
            sampling=sampling if isinstance(sampling, SamplingParams) else SamplingParams(**(sampling or {})),
            policy_version=policy_version, engine=engine, model=model, latency_ms=latency_ms,
            episode=EpisodeRef.model_validate(episode) if isinstance(episode, dict) else episode)
        self._emit(event, event.key)
        return event

    def feedback(self, session_id: str, kind: str, *, turn_index: int | None = None, text: str | None = None,
                 thumbs: int | None = None, reward: float | None = None, exit_code: int | None = None,
                 passed: bool | None = None, metadata: dict[str, Any] | None = None,
                 parent_ids: list[str] | None = None, group_id: str | None = None) -> FeedbackReceived:
        """Record a next state; raises pydantic's ValidationError on fields that do not fit.
        `group_id`: the session is a rollout of that group (give it for every feedback of a
        rollout whose turns named an episode: it picks the partition, schemas.events.session_key)."""
        fb = FeedbackRequest(session_id=session_id, kind=kind, turn_index=turn_index, text=text,
                             thumbs=thumbs, reward=reward, exit_code=exit_code, passed=passed,
                             source=self.source, metadata=metadata, parent_ids=parent_ids or [],
                             group_id=group_id)
        event = FeedbackReceived(
            tenant=self.tenant, session_id=fb.session_id, turn_index=fb.turn_index, kind=fb.kind,
            text=fb.text, thumbs=fb.thumbs, reward=fb.reward, exit_code=fb.exit_code, passed=fb.passed,
            source=fb.source, parent_ids=fb.parent_ids,
            metadata_json=orjson.dumps(fb.metadata).decode() if fb.metadata is not None else None,
            group_id=fb.group_id)
        self._emit(event, event.key)
        return event

    def session(self, session_id: str | None = None, first_turn: int = 0) -> "SessionRecorder":
        return SessionRecorder(self, session_id or f"sdk-{uuid.uuid4().hex[:16]}", first_turn)

    # -- delivery -------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events spooled and not yet acknowledged by Kafka (0 without a spool)."""
        return self._spool.depth if self._spool is not None else 0

    def flush(self, timeout: float = 30.0) -> None:
        """Direct mode: wait for Kafka to acknowledge everything (DeliveryError if not).
        Spool mode: everything is already durable locally; this returns at once."""
        if self._producer is not None:
            self._producer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._producer is not None:
            self._producer.close(timeout)
        if self._drainer is not None:
            self._drainer.stop(drain_timeout_s=timeout)
            self._spool.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SessionRecorder:
    """One session's turns (indices counted for you) and feedback."""

    def __init__(self, recorder: Recorder, session_id: str, first_turn: int = 0) -> None:
        self.recorder, self.session_id, self.next_turn = recorder, session_id, first_turn
        self.group_id: str | None = None   # set by the first turn that names an episode

    def turn(self, **fields: Any) -> TurnRecorded:
        event = self.recorder.record_turn(session_id=self.session_id, turn_index=self.next_turn, **fields)
        self.next_turn += 1
        if event.episode is not None:
            self.group_id = event.episode.group_id
        return event

    def feedback(self, kind: str, **fields: Any) -> FeedbackReceived:
        fields.setdefault("group_id", self.group_id)
        return self.recorder.feedback(self.session_id, kind, **fields)

    def thumbs(self, up: bool, turn_index: int | None = None) -> FeedbackReceived:
        return self.feedback("thumbs", thumbs=1 if up else -1, turn_index=turn_index)

    def reward(self, value: float, turn_index: int | None = None) -> FeedbackReceived:
        return self.feedback("outcome_reward", reward=value, turn_index=turn_index)

    def end(self) -> FeedbackReceived:
        last = self.next_turn - 1 if self.next_turn else None
        return self.feedback("session_end", turn_index=last)
