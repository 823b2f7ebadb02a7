"""Typed Python models of the events, one per ``.avsc`` (tests/schemas holds each against it).

Names are past-tense facts. Every event carries ``event_id``, ``occurred_at``,
``schema_version`` and ``parent_ids``. Token arrays are plain lists here; they are packed
into little-endian bytes on the wire (see ``schemas.codecs``).

Event ids of derived events come from ``derived_id(stage, *parents)``, so a stage that
reprocesses the same input produces the same ids and downstream can drop duplicates.
"""

from __future__ import annotations

import uuid
from array import array
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

_ID_NAMESPACE = uuid.UUID("6f1c2a54-3b7e-4d6a-9a51-2e0c8f3b9d10")


def new_id() -> str:
    return str(uuid.uuid4())


def derived_id(stage: str, *parents: str) -> str:
    """A deterministic event id for what `stage` derived from `parents`."""
    return str(uuid.uuid5(_ID_NAMESPACE, "|".join((stage, *parents))))


def now() -> datetime:
    # Avro timestamp-millis keeps milliseconds; truncating here makes round trips exact.
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


# fastavro hands uuid logical types back as uuid.UUID; events keep ids as strings.
EventId = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, uuid.UUID) else v)]


def _as_float32(values: list[float]) -> list[float]:
    return array("f", values).tolist()


# Logprobs travel as float32; rounding at construction makes every round trip exact.
Float32List = Annotated[list[float], AfterValidator(_as_float32)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Event(_Model):
    """Fields every event carries."""

    SCHEMA_VERSION: ClassVar[int] = 1

    event_id: EventId = Field(default_factory=new_id)
    occurred_at: datetime = Field(default_factory=now)
    schema_version: int = 1
    parent_ids: list[str] = Field(default_factory=list)

    def to_avro(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> "Event":
        return cls.model_validate(record)


# -- turns ------------------------------------------------------------------------------

class SessionSource(StrEnum):
    HEADER = "HEADER"
    BODY = "BODY"
    DERIVED = "DERIVED"


class TurnType(StrEnum):
    MAIN = "MAIN"
    SIDE = "SIDE"


class SamplingParams(_Model):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                # the k most likely tokens only; 0: all
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    grammar: str | None = None    # EBNF the answer was constrained to (serving.grammar); None: free


class EpisodeRef(_Model):
    """The rollout a turn is a step of (general agents)."""

    task_id: str
    group_id: str
    rollout_index: int = Field(ge=0, le=2**31 - 1)   # Avro int
    env: str
    env_version: str = ""
    attempt: int = Field(default=0, ge=0, le=2**31 - 1)


def session_key(session_id: str, group_id: str | None = None) -> str:
    """The Kafka key of a session's turns and feedback: the session id, or for a rollout of a
    group its group's id. Records with one key share a partition, and every stage sends what it
    derives on the partition it read from, so a session's turns and feedback meet in sessionize
    and a group's rollouts (their transitions, judgements and EpisodeEnded) meet in the group
    stage. Every producer of turns, feedback and episodes keys by this function."""
    return group_id or session_id


class TurnRecorded(Event):
    tenant: str
    session_id: str
    session_source: SessionSource = SessionSource.HEADER
    turn_index: int
    turn_type: TurnType
    request_id: str
    messages_json: str
    tools_json: str | None = None
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: Float32List
    response_text: str
    finish_reason: str
    sampling: SamplingParams
    policy_version: int
    engine: str
    model: str
    latency_ms: float = 0.0
    episode: EpisodeRef | None = None
    continue_final_message: bool = False   # the last message is a prefill the response continues

    @property
    def key(self) -> str:
        return session_key(self.session_id, self.episode.group_id if self.episode else None)


# -- feedback ---------------------------------------------------------------------------

class FeedbackKind(StrEnum):
    USER_MESSAGE = "USER_MESSAGE"
    TOOL_OUTPUT = "TOOL_OUTPUT"
    TERMINAL_OUTPUT = "TERMINAL_OUTPUT"
    TEST_RESULT = "TEST_RESULT"
    GUI_CHANGE = "GUI_CHANGE"
    THUMBS = "THUMBS"
    OUTCOME_REWARD = "OUTCOME_REWARD"
    SESSION_END = "SESSION_END"


class FeedbackReceived(Event):
    tenant: str
    session_id: str
    turn_index: int | None = None
    kind: FeedbackKind
    text: str | None = None
    thumbs: int | None = None
    reward: float | None = None
    exit_code: int | None = None
    passed: bool | None = None
    source: str = "client"
    metadata_json: str | None = None
    group_id: str | None = None   # the session is a rollout of this group (schemas.events.session_key)

    @property
    def key(self) -> str:
        return session_key(self.session_id, self.group_id)


# -- transitions ------------------------------------------------------------------------

class NextStateKind(StrEnum):
    NEXT_TURN = "NEXT_TURN"
    FEEDBACK = "FEEDBACK"
    SESSION_END = "SESSION_END"
    TIMEOUT = "TIMEOUT"


class TransitionFormed(Event):
    tenant: str
    session_id: str
    turn_index: int
    turn: TurnRecorded
    next_state_kind: NextStateKind
    next_messages_json: str = "[]"
    feedback: list[FeedbackReceived] = Field(default_factory=list)
    next_turn_event_id: str | None = None


# -- judgements -------------------------------------------------------------------------

class JudgeVote(_Model):
    index: int
    raw_text: str
    score: int | None = None
    latency_ms: float = 0.0
    error: str | None = None


class RewardJudged(Event):
    tenant: str
    session_id: str
    turn_index: int
    transition_id: str
    turn_id: str
    judge: str
    judge_model: str
    judge_version: str
    prompt_sha256: str
    votes: list[JudgeVote]
    majority: int
    vote_mean: float | None = None
    latency_ms: float = 0.0
    group_id: str | None = None   # the rollout's group, for a step of one (general agents)


# -- hints ------------------------------------------------------------------------------

class HintVote(_Model):
    index: int
    raw_text: str
    score: int | None = None
    hint: str | None = None
    latency_ms: float = 0.0
    error: str | None = None


class HintCandidate(_Model):
    hint: str
    vote_index: int
    overlap_score: float | None = None


class HintSelection(StrEnum):
    LONGEST = "LONGEST"
    OVERLAP_SEQUENCE = "OVERLAP_SEQUENCE"
    OVERLAP_TOKEN = "OVERLAP_TOKEN"


class HintJudged(Event):
    tenant: str
    session_id: str
    turn_index: int
    transition_id: str
    turn_id: str
    judge_model: str
    judge_version: str
    prompt_sha256: str
    votes: list[HintVote]
    candidates: list[HintCandidate] = Field(default_factory=list)
    selection: HintSelection
    accepted_hint: str | None = None
    rejected_reason: str | None = None
    teacher_policy: str | None = None
    teacher_policy_version: int | None = None
    teacher_logprobs: Float32List | None = None
    teacher_top_ids: list[int] | None = None
    teacher_top_logprobs: Float32List | None = None
    teacher_answer_ids: list[int] | None = None         # the teacher's own answer (processors.teacher_answers)
    teacher_answer_logprobs: Float32List | None = None


def top_k_problem(what: str, n: int, ids: list[int] | None, logprobs: list[float] | None) -> str | None:
    """Why a teacher's top-K rows (K per response token, row-major) do not fit `n` tokens."""
    if ids is None and logprobs is None:
        return None
    if ids is None or logprobs is None:
        return f"{what} has teacher top-K {'ids' if ids is not None else 'logprobs'} without the other"
    if len(ids) != len(logprobs):
        return f"{what} has {len(ids)} teacher top-K ids but {len(logprobs)} logprobs"
    if not ids or len(ids) % n:
        return f"{what} has {len(ids)} teacher top-K entries, not K ≥ 1 for each of its {n} response tokens"
    if min(ids) < 0:
        return f"{what} has a negative teacher top-K token id"
    if max(logprobs) > 1e-4:
        return f"{what} has a teacher top-K logprob above 0"
    return None


# -- samples ----------------------------------------------------------------------------

class TeacherPolicy(StrEnum):
    """Which weights teach: the frozen base, or the policy served now (recorded on HintJudged)."""

    BASE = "base"
    CURRENT = "current"


class Method(StrEnum):
    RL = "RL"
    OPD = "OPD"
    COMBINED = "COMBINED"


TEACHER_ANSWER = "teacher"   # the normaliser of the hinted teacher's own answer (processors.assemble)


class SampleReady(Event):
    tenant: str
    session_id: str
    turn_index: int
    method: Method
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: Float32List
    teacher_logprobs: Float32List | None = None
    teacher_top_ids: list[int] | None = None
    teacher_top_logprobs: Float32List | None = None
    reward: float
    policy_version: int
    task_group: str | None = None
    step_index: int | None = None
    outcome: float | None = None
    process_reward: float | None = None
    step_reward: float | None = None
    advantage: float | None = None
    normaliser: str | None = None
    group_size: int | None = None
    revision_of: str | None = None   # a hindsight revision of that sample (processors.assemble)

    def problem(self) -> str | None:
        """Why this sample cannot be trained on (its arrays disagree, it has nothing to
        predict), naming the values; None if it is well formed. Assemble refuses to emit such
        a sample and the learner dead-letters one it reads: both ask here."""
        what = f"sample {self.event_id} ({self.method.value}, session {self.session_id})"
        n = len(self.response_token_ids)
        if not self.prompt_token_ids:
            return f"{what} has an empty prompt: nothing predicts its first token"
        if n == 0:
            return f"{what} has no response tokens"
        lengths = {"loss_mask": len(self.loss_mask), "behaviour_logprobs": len(self.behaviour_logprobs)}
        if self.teacher_logprobs is not None:
            lengths["teacher_logprobs"] = len(self.teacher_logprobs)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            return f"{what} has {n} response tokens but " + ", ".join(f"{v} {k}" for k, v in bad.items())
        if any(m not in (0, 1) for m in self.loss_mask):
            return f"{what} has loss_mask values other than 0/1"
        return top_k_problem(what, n, self.teacher_top_ids, self.teacher_top_logprobs)

    @property
    def teacher_answer(self) -> bool:
        """The hinted teacher's own answer beside the student's sample it names, not the student's."""
        return self.revision_of is not None and self.normaliser == TEACHER_ANSWER

    @property
    def teacher_top_k(self) -> int:
        """K of the teacher's top-K rows (0 without them)."""
        return len(self.teacher_top_ids or ()) // max(len(self.response_token_ids), 1)


# -- checkpoints ------------------------------------------------------------------------

class CheckpointKind(StrEnum):
    FULL = "FULL"
    LORA = "LORA"


class CheckpointFile(_Model):
    path: str
    sha256: str
    size_bytes: int


class PartitionOffset(_Model):
    topic: str
    partition: int
    offset: int


class CheckpointPublished(Event):
    run: str
    version: int
    parent_version: int | None = None
    kind: CheckpointKind
    base_model: str
    uri: str
    files: list[CheckpointFile]
    consumed_offsets: list[PartitionOffset]
    step: int
    samples_trained: int
    metrics: dict[str, float] = Field(default_factory=dict)


# -- dead letters -----------------------------------------------------------------------

class DeadLettered(Event):
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: dict[str, bytes] = Field(default_factory=dict)
    error_type: str
    error: str

    @classmethod
    def of(cls, stage: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
           exc: BaseException | str, headers: dict[str, bytes] | None = None,
           parent_ids: list[str] | None = None) -> "DeadLettered":
        """The one way a dead letter is made: where the record sat, its raw bytes and why it
        was set aside. The id is derived from the stage and the place (and the parents, for a
        record that has no place), so setting the same record aside twice gives one id."""
        import traceback

        if isinstance(exc, BaseException):
            error_type, error = type(exc).__name__, "".join(traceback.format_exception_only(exc)).strip()
        else:
            error_type, error = "Error", exc
        return cls(
            event_id=derived_id("dead-letter", stage, topic, str(partition), str(offset), *(parent_ids or [])),
            parent_ids=parent_ids or [], stage=stage, source_topic=topic, source_partition=partition,
            source_offset=offset, key=key, value=value, headers=headers or {}, error_type=error_type, error=error)


# -- general agents: tasks and episodes ----------------------------------------------------

class GroupKeyed:
    """A task's or a rollout's event (it has a `group_id` field): keyed by its group
    (schemas.events.session_key)."""

    @property
    def key(self) -> str:
        return session_key("", self.group_id)  # type: ignore[attr-defined]


class TaskIssued(GroupKeyed, Event):
    task_id: str
    group_id: str
    env: str
    spec_json: str
    spec_sha256: str
    group_size: int
    seed: int = 0
    tenant: str = "default"


class EpisodeStarted(GroupKeyed, Event):
    task_id: str
    group_id: str
    rollout_index: int
    attempt: int = 0
    session_id: str
    env: str
    env_version: str
    spec_sha256: str
    seed: int
    group_size: int
    sandbox: str = ""


class EpisodeEnd(StrEnum):
    ANSWERED = "ANSWERED"
    STEP_LIMIT = "STEP_LIMIT"
    TIME_LIMIT = "TIME_LIMIT"
    ERROR = "ERROR"


class EpisodeEnded(GroupKeyed, Event):
    task_id: str
    group_id: str
    rollout_index: int
    attempt: int = 0
    session_id: str
    outcome: float
    verifier: str
    verifier_version: str
    verifier_result_json: str | None = None
    ended: EpisodeEnd
    detail: str | None = None
    steps: int
    tenant: str = "default"
    group_size: int | None = None   # the n of its group, as EpisodeStarted says
    first_turn_index: int = Field(default=0, ge=0, le=2**31 - 1)   # its steps: this index and the next steps - 1


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        TurnRecorded,
        FeedbackReceived,
        TransitionFormed,
        RewardJudged,
        HintJudged,
        SampleReady,
        CheckpointPublished,
        DeadLettered,
        TaskIssued,
        EpisodeStarted,
        EpisodeEnded,
    )
}
