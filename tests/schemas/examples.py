"""One filled-in example of every event, with every optional field set, for round-trip tests."""

from __future__ import annotations

import json

from schemas.events import (
    CheckpointFile,
    CheckpointKind,
    CheckpointPublished,
    DeadLettered,
    EpisodeEnd,
    EpisodeEnded,
    EpisodeRef,
    EpisodeStarted,
    Event,
    FeedbackKind,
    FeedbackReceived,
    HintCandidate,
    HintJudged,
    HintSelection,
    HintVote,
    JudgeVote,
    Method,
    NextStateKind,
    PartitionOffset,
    RewardJudged,
    SampleReady,
    SamplingParams,
    SessionSource,
    TaskIssued,
    TransitionFormed,
    TurnRecorded,
    TurnType,
)


def examples(session: str = "s-1") -> dict[str, Event]:
    turn = TurnRecorded(
        tenant="acme", session_id=session, session_source=SessionSource.DERIVED, turn_index=2,
        turn_type=TurnType.MAIN, request_id="r-1",
        messages_json=json.dumps([{"role": "user", "content": "list files"}]),
        tools_json=json.dumps([{"type": "function", "function": {"name": "ls"}}]),
        prompt_token_ids=[1, 2, 3, 49151], response_token_ids=[7, 8, -1 + 2**31],
        response_logprobs=[-0.1, -2.5, -0.0], response_text="ls -la", finish_reason="stop",
        sampling=SamplingParams(temperature=0.6, top_p=0.9, max_new_tokens=64, seed=7, stop=["\n"]),
        policy_version=3, engine="local", model="tiny", latency_ms=12.5,
        episode=EpisodeRef(task_id="t-1", group_id="g1", rollout_index=2, env="toolcall", env_version="1",
                           attempt=1),
    )
    feedback = FeedbackReceived(
        tenant="acme", session_id=session, turn_index=2, kind=FeedbackKind.TEST_RESULT,
        text="2 failed", thumbs=-1, reward=-0.5, exit_code=1, passed=False, source="pytest",
        metadata_json='{"suite": "unit"}', parent_ids=[turn.event_id],
    )
    transition = TransitionFormed(
        tenant="acme", session_id=session, turn_index=2, turn=turn,
        next_state_kind=NextStateKind.FEEDBACK,
        next_messages_json=json.dumps([{"role": "tool", "content": "permission denied"}]),
        feedback=[feedback], next_turn_event_id=None, parent_ids=[turn.event_id, feedback.event_id],
    )
    judged = RewardJudged(
        tenant="acme", session_id=session, turn_index=2, transition_id=transition.event_id,
        turn_id=turn.event_id, judge="llm", judge_model="judge-1", judge_version="v1",
        prompt_sha256="ab" * 32,
        votes=[JudgeVote(index=0, raw_text="\\boxed{-1}", score=-1, latency_ms=3.0),
               JudgeVote(index=1, raw_text="garbled", score=None, error="no boxed answer")],
        majority=-1, vote_mean=-1.0, latency_ms=4.0, parent_ids=[transition.event_id],
    )
    hint = HintJudged(
        tenant="acme", session_id=session, turn_index=2, transition_id=transition.event_id,
        turn_id=turn.event_id, judge_model="judge-1", judge_version="v1", prompt_sha256="cd" * 32,
        votes=[HintVote(index=0, raw_text="\\boxed{1} [HINT_START]check perms[HINT_END]", score=1,
                        hint="check the permissions first")],
        candidates=[HintCandidate(hint="check the permissions first", vote_index=0, overlap_score=0.75)],
        selection=HintSelection.OVERLAP_SEQUENCE, accepted_hint="check the permissions first",
        teacher_policy="base", teacher_policy_version=0, teacher_logprobs=[-0.2, -1.0, -0.5],
        teacher_answer_ids=[12, 13], teacher_answer_logprobs=[-0.25, -0.75],
        parent_ids=[transition.event_id],
    )
    sample = SampleReady(
        tenant="acme", session_id=session, turn_index=2, method=Method.COMBINED,
        prompt_token_ids=turn.prompt_token_ids, response_token_ids=turn.response_token_ids,
        loss_mask=[1, 1, 0], behaviour_logprobs=turn.response_logprobs,
        teacher_logprobs=hint.teacher_logprobs, reward=-1.0, policy_version=3,
        task_group="g1", step_index=0, outcome=-1.0, process_reward=-1.0, step_reward=-2.0,
        advantage=-1.2247, normaliser="bucket", group_size=4,
        parent_ids=[turn.event_id, transition.event_id, judged.event_id, hint.event_id],
    )
    checkpoint = CheckpointPublished(
        run="main", version=4, parent_version=3, kind=CheckpointKind.LORA, base_model="tiny",
        uri="s3://nextstate-checkpoints/main/v00000004/",
        files=[CheckpointFile(path="weights/adapter_model.safetensors", sha256="ef" * 32, size_bytes=1234)],
        consumed_offsets=[PartitionOffset(topic="nextstate.samples", partition=0, offset=17)],
        step=4, samples_trained=64, metrics={"loss": 0.25, "reward_mean": -0.1},
    )
    dead = DeadLettered(
        stage="judge", source_topic="nextstate.transitions", source_partition=1, source_offset=99,
        key=b"s-1", value=b"\x00\xff garbage", headers={"h": b"v"}, error_type="DecodeError",
        error="cannot decode record",
    )
    task = TaskIssued(task_id="t-1", group_id="g1", env="toolcall", spec_json='{"question": "2+2?", "answer": 4}',
                      spec_sha256="12" * 32, group_size=4, seed=9, tenant="acme")
    started = EpisodeStarted(task_id="t-1", group_id="g1", rollout_index=2, attempt=1, session_id=session,
                             env="toolcall", env_version="1", spec_sha256=task.spec_sha256, seed=11, group_size=4,
                             sandbox="namespaces", parent_ids=[task.event_id])
    ended = EpisodeEnded(task_id="t-1", group_id="g1", rollout_index=2, attempt=1, session_id=session,
                         outcome=-0.9, verifier="numeric", verifier_version="1",
                         verifier_result_json='{"expected": 4, "got": 5}', ended=EpisodeEnd.STEP_LIMIT,
                         detail="4 steps", steps=4, tenant="acme", parent_ids=[started.event_id])
    return {e.__class__.__name__: e for e in
            (turn, feedback, transition, judged, hint, sample, checkpoint, dead, task, started, ended)}
