"""The audit trail: from any sample, turn or session back to everything that explains it.

`infra.eventlog.read_log` reads every topic of a namespace (the log is the database); `lineage` is pure and walks the ids events carry: a sample's parents (turn,
transition, judgement, hint), the transition's next state and feedback, every judge vote
with its raw text, the hint decision, and the checkpoints whose consumed offsets cover the
sample's offset. For a step of a rollout (general agents) also its episode (how it ended, the
outcome and what the verifier said) and its group: every rollout's outcome and every step's
process reward, step reward, advantage and normaliser. `render` prints it. Knows nothing about training or serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from infra.eventlog import Logged
from schemas.events import (
    CheckpointPublished,
    EpisodeEnded,
    FeedbackReceived,
    HintJudged,
    RewardJudged,
    SampleReady,
    TransitionFormed,
    TurnRecorded,
)


@dataclass
class Lineage:
    turn: TurnRecorded | None = None
    transition: TransitionFormed | None = None
    feedback: list[FeedbackReceived] = field(default_factory=list)
    judgements: list[RewardJudged] = field(default_factory=list)
    hints: list[HintJudged] = field(default_factory=list)
    samples: list[Logged] = field(default_factory=list)
    checkpoints: list[CheckpointPublished] = field(default_factory=list)
    episode: EpisodeEnded | None = None                            # the rollout this turn is a step of
    group_ends: list[EpisodeEnded] = field(default_factory=list)    # every rollout of its group
    group_samples: list[SampleReady] = field(default_factory=list)  # every step sample of its group


def lineage(log: list[Logged], turn_id: str) -> Lineage:
    """Everything tied to one turn."""
    out = Lineage()
    for item in log:
        e = item.event
        if isinstance(e, TurnRecorded) and e.event_id == turn_id:
            out.turn = e
        elif isinstance(e, TransitionFormed) and e.turn.event_id == turn_id:
            out.transition = e
            out.turn = out.turn or e.turn
            out.feedback.extend(e.feedback)
        elif isinstance(e, (RewardJudged, HintJudged)) and e.turn_id == turn_id:
            (out.judgements if isinstance(e, RewardJudged) else out.hints).append(e)
        elif isinstance(e, FeedbackReceived) and turn_id in e.parent_ids:
            if all(f.event_id != e.event_id for f in out.feedback):
                out.feedback.append(e)
        elif isinstance(e, SampleReady) and turn_id in e.parent_ids:
            out.samples.append(item)
    for sample in out.samples:
        out.checkpoints.extend(c for c in trained_by(log, sample) if c not in out.checkpoints)
    ep = out.turn.episode if out.turn is not None else None
    if ep is not None:
        for item in log:
            e = item.event
            if isinstance(e, EpisodeEnded) and e.group_id == ep.group_id:
                out.group_ends.append(e)
                if e.session_id == out.turn.session_id:
                    out.episode = e
            elif isinstance(e, SampleReady) and e.task_group == ep.group_id:
                out.group_samples.append(e)
    return out


def trained_by(log: list[Logged], sample: Logged) -> list[CheckpointPublished]:
    """Per run, the first checkpoint whose consumed offsets pass the sample's offset."""
    firsts: dict[str, CheckpointPublished] = {}
    for item in log:
        c = item.event
        if not isinstance(c, CheckpointPublished):
            continue
        covered = any(o.topic == sample.topic and o.partition == sample.partition
                      and o.offset > sample.offset for o in c.consumed_offsets)
        if covered and (c.run not in firsts or c.version < firsts[c.run].version):
            firsts[c.run] = c
    return sorted(firsts.values(), key=lambda c: (c.run, c.version))


def resolve(log: list[Logged], some_id: str) -> list[str]:
    """Turn ids for a sample, turn, transition, judgement or session id."""
    turns = [i.event for i in log if isinstance(i.event, TurnRecorded)]
    if any(t.event_id == some_id for t in turns):
        return [some_id]
    for item in log:
        e = item.event
        if e.event_id == some_id:
            if isinstance(e, TransitionFormed):
                return [e.turn.event_id]
            if isinstance(e, (RewardJudged, HintJudged)):
                return [e.turn_id]
            if isinstance(e, SampleReady):
                ids = {t.event_id for t in turns}
                return [p for p in e.parent_ids if p in ids][:1] or e.parent_ids[:1]
    session = sorted((t for t in turns if t.session_id == some_id), key=lambda t: t.turn_index)
    return [t.event_id for t in session]


def render(lin: Lineage, console: Console) -> None:
    t = lin.turn
    if t is None:
        console.print("[red]turn not found in the log[/red]")
        return
    messages = json.loads(t.messages_json)
    last = messages[-1]["content"] if messages else ""
    console.print(Panel(
        f"session {t.session_id} · turn {t.turn_index} ({t.turn_type.value}) · policy v{t.policy_version} "
        f"· {t.engine}/{t.model}\n[bold]last message:[/bold] {str(last)[:400]}\n"
        f"[bold]response ({len(t.response_token_ids)} tokens):[/bold] {t.response_text[:600]}",
        title=f"turn {t.event_id}"))
    if lin.transition:
        tr = lin.transition
        console.print(Panel(
            f"kind {tr.next_state_kind.value}\n{tr.next_messages_json[:600]}"
            + "".join(f"\nfeedback {f.kind.value}: {f.text or ''} thumbs={f.thumbs} reward={f.reward}"
                      for f in lin.feedback),
            title=f"next state {tr.event_id}"))
    for j in lin.judgements:
        table = Table(title=f"judgement {j.event_id} · {j.judge} {j.judge_model}@{j.judge_version} "
                            f"· majority {j.majority:+d}")
        for col in ("vote", "score", "raw text"):
            table.add_column(col)
        for v in j.votes:
            table.add_row(str(v.index), "invalid" if v.score is None else f"{v.score:+d}",
                          (v.error or v.raw_text)[:300])
        console.print(table)
    for h in lin.hints:
        console.print(Panel(
            f"selection {h.selection.value} · accepted: {h.accepted_hint!r}"
            + (f" · rejected: {h.rejected_reason}" if h.rejected_reason else "")
            + "".join(f"\ncandidate {c.vote_index}: {c.hint!r} overlap={c.overlap_score}" for c in h.candidates)
            + (f"\nteacher {h.teacher_policy} v{h.teacher_policy_version}" if h.teacher_policy else "")
            + (f"\nthe teacher's own answer: {len(h.teacher_answer_ids)} tokens" if h.teacher_answer_ids else ""),
            title=f"hint {h.event_id}"))
    if t.episode is not None:
        render_group(lin, console)
    for item in lin.samples:
        s = item.event
        step = (f" · the teacher's own answer beside {s.revision_of}, advantage {s.advantage:+.3f}"
                if s.teacher_answer else
                f" · revision of {s.revision_of}, advantage {s.advantage:+.3f}" if s.revision_of else
                f" · advantage {s.advantage:+.3f} ({s.normaliser}, group of {s.group_size})"
                if s.advantage is not None else "")
        console.print(f"sample {s.event_id} · {s.method.value} · reward {s.reward:+.2f}{step} · "
                      f"{sum(s.loss_mask)}/{len(s.loss_mask)} tokens trained · "
                      f"{item.topic}[{item.partition}]@{item.offset}")
    for c in lin.checkpoints:
        console.print(f"trained into checkpoint {c.run} v{c.version} ({c.kind.value}) at {c.uri}")
    if lin.samples and not lin.checkpoints:
        console.print("not yet trained into any published checkpoint")


def render_group(lin: Lineage, console: Console) -> None:
    ep, e = lin.turn.episode, lin.episode
    head = (f"task {ep.task_id} · env {ep.env or '?'} {ep.env_version} · group {ep.group_id} · "
            f"rollout {ep.rollout_index} · attempt {ep.attempt}")
    if e is None:
        console.print(Panel(head + "\nthe rollout has not ended (no EpisodeEnded in the log)", title="episode"))
    else:
        console.print(Panel(
            f"{head}\nended {e.ended.value} after {e.steps} steps · outcome {e.outcome:+.2f} · verifier "
            f"{e.verifier}@{e.verifier_version}: {(e.verifier_result_json or '')[:400]}"
            + (f"\n{e.detail}" if e.detail else ""), title=f"episode {e.event_id}"))
    outcomes = {(x.attempt, x.rollout_index): x for x in lin.group_ends}
    table = Table(title=f"group {ep.group_id}: {len(lin.group_ends)} rollouts ended, "
                        f"{len(lin.group_samples)} step samples")
    for col in ("rollout", "step", "ended", "outcome", "process", "step reward", "advantage", "normaliser"):
        table.add_column(col)
    by_session = {x.session_id: x for x in lin.group_ends}
    for s in sorted(lin.group_samples, key=lambda s: (s.session_id, s.step_index or 0)):
        end = by_session.get(s.session_id)
        mark = " ◀" if s.session_id == lin.turn.session_id and s.turn_index == lin.turn.turn_index else ""
        table.add_row(f"{end.rollout_index if end else '?'}{mark}", str(s.step_index), end.ended.value if end else "?",
                      f"{s.outcome:+.2f}" if s.outcome is not None else "-",
                      f"{s.process_reward:+.2f}" if s.process_reward is not None else "-",
                      f"{s.step_reward:+.2f}" if s.step_reward is not None else "-",
                      f"{s.advantage:+.3f}" if s.advantage is not None else "-", s.normaliser or "-")
    untrained = [x for k, x in sorted(outcomes.items()) if all(s.session_id != x.session_id for s in lin.group_samples)]
    for x in untrained:
        table.add_row(str(x.rollout_index), "-", x.ended.value, f"{x.outcome:+.2f}", "-", "-", "-",
                      f"no sample{': ' + x.detail[:60] if x.detail else ''}")
    console.print(table)
