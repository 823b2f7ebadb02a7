"""`nextstate bench personal`: does the personal-agent loop learn a user's preference with
`nextstate up`'s defaults, and do the answers stay answers?

For each hidden preference (one simulated population at a time, a fresh namespace each) it
starts the loop's parts as `nextstate up` would configure them — the learning settings are the
defaults or whatever the environment sets, nothing tuned here — with one learner run per method
on the same sample log and a gateway per run that follows that run's checkpoints. Then:

1. **Ceilings.** 16 held-out probe questions, greedy, as side turns through the gateway: the
   base model's rate, and the *hint-conditioned* base model's rate (each question with the
   user's correction added exactly as the teacher sees a hint, serving.chat's `hinted_text` at
   `processors.hint_placement`).
   The second is what OPD can at most distil.
2. **Learning.** Simulated users with the preference talk to the served run's gateway (the
   first method, the default `combined`). Users come in rounds: on 2 CPU cores a learner step
   is slower than a round of conversations, so before the next round every run trains on what
   the last one produced and its gateway serves that checkpoint; the rounds stand in for users
   who take their time. After each round every run is probed the same way.
3. **Answer quality**, on the probes: the distinct word-bigram share against the base's, answers
   that repeat a sentence three times, non-answers, and the base model's mean per-token logprob
   of the answers (the base weights, loaded here after the parts stopped). The hinted base's
   answers are scored the same way, against the plain questions: what following the preference
   the base model's own way costs in that logprob.
4. **Goals** (`Goals`): each run against the bar the personal loop is held to — 0.8 greedy
   within 24 interactions and still after the last round where the hinted base meets the
   preference at least half the time, above the base elsewhere; a `combined` run at least as
   good as `rl` and `opd` in every round; no looping probe answer in any round; word pairs at
   least 0.9× the base's; the base model's logprob of the answers at most 0.5 nats per token
   below its logprob of its own answers. `--report results.json` prints all of it again.

The `rl` and `opd` runs (and any variant named METHOD:NAME=VALUE,...) learn from the served
run's samples: off-policy for them, on-policy for the served run. Results go to
`<out>/<run>/results.json` and `curves.png`; the table is printed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra.cli.demo import Parts, _caught_up, _wait_healthy, launch
from infra.errors import ConfigError
from infra.settings import Settings
from producers.simulated.harness import GatewayUsers, ProbeResult
from producers.simulated.personas import PERSONAS, split_questions
from producers.simulated.quality import distinct_bigram_share, looping, unanswered
from serving.chat import hinted_text

DEFAULT_PREFERENCES = ("brief", "lowercase", "curious", "formal")


@dataclass(frozen=True)
class Variant:
    """One learner run: a method and, for an ablation, settings of its own."""

    name: str
    method: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """`combined` or `combined:loss.w_rl=0.25,lr=1e-3` (learner settings, dotted)."""
        method, _, rest = spec.partition(":")
        env = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, _, value = item.partition("=")
            if not value:
                raise ValueError(f"variant {spec!r}: {item!r} is not name=value")
            env["NEXTSTATE_LEARNER__" + "__".join(k.upper() for k in key.strip().split("."))] = value.strip()
        name = method if not env else f"{method}[{rest}]"
        return cls(name, method.strip(), env)

    def learner(self) -> Any:
        """The learner settings this variant's learner process loads: this environment and the
        variant's own (the child's parse, not a second one)."""
        import os
        from unittest import mock

        from infra.settings import load_settings

        with mock.patch.dict(os.environ, self.env):
            return load_settings().learner


@dataclass(frozen=True)
class Goals:
    """The bar a run is held to; `check_goals` reports each part of it."""

    target: float = 0.8   # greedy first-response satisfaction on the probes
    within: int = 24      # reached within this many interactions ...
    learnable: float = 0.5   # ... where the hinted base meets the preference at least this often
    bigram_ratio: float = 0.9   # distinct word pairs against the base's, after the last round
    # how far the base model's mean per-token logprob of the answers (after the last round) may
    # fall below that of its own answers: e^0.5 ≈ 1.65× less likely per token. The hinted base's
    # own answers fell 0.12 (formal) and 0.21 (brief); the evasive non-answers of `opd` anchored
    # at the policy 1.28–1.57.
    logprob_margin: float = 0.5


@dataclass
class PersonalBenchConfig:
    preferences: tuple[str, ...] = DEFAULT_PREFERENCES
    variants: tuple[Variant, ...] = (Variant("combined", "combined"), Variant("rl", "rl"), Variant("opd", "opd"))
    interactions: int = 48
    round_sessions: int = 12
    concurrency: int = 6
    max_tokens: int = 64
    probe_max_tokens: int = 96
    temperature: float = 1.0
    # besides the greedy probes: this many answers to each probe at the users' temperature
    # (what a user gets), 0 none
    probe_samples: int = 4
    model: str | None = None
    seed: int = 0
    port: int = 30300
    round_wait_s: float = 600.0
    out_dir: Path = Path("out/bench-personal")
    keep_checkpoints: bool = False
    goals: Goals = field(default_factory=Goals)


@dataclass
class Probe:
    variant: str
    interactions: int
    version: int
    rate: float
    answers: list[str]
    base_logprob: float | None = None
    sampled_rate: float | None = None   # at the users' temperature, probe_samples per question
    sampled_looping: float | None = None   # the share of those sampled answers that loop

    def quality(self, base_share: float) -> dict[str, Any]:
        """Answer-quality measures of these answers to the probe questions (in their order)."""
        share = distinct_bigram_share(self.answers)
        return {"bigram_share": share, "bigram_ratio": share / base_share if base_share else None,
                "looping": looping(self.answers),
                "unanswered": unanswered(split_questions()[1], self.answers) if self.answers else 0.0,
                "base_logprob": self.base_logprob}


@dataclass
class PreferenceResult:
    preference: str
    base: Probe
    hinted: Probe
    probes: list[Probe] = field(default_factory=list)
    sessions: int = 0
    failure: str | None = None


def _method(variant: str) -> str:
    return variant.partition("[")[0]


def check_goals(r: PreferenceResult, variants: list[str], goals: Goals) -> list[dict[str, Any]]:
    """Each run of one preference against `goals`: the figures and whether each part is met
    (None where a part does not apply). Empty when no round was probed."""
    rounds = sorted({p.interactions for p in r.probes})
    by = {(p.variant, p.interactions): p for p in r.probes}
    learnable = r.hinted.rate >= goals.learnable
    base_share = distinct_bigram_share(r.base.answers)
    parts = [v for v in variants if v in ("rl", "opd")]   # the plain runs of each part
    rows = []
    for v in variants:
        mine = [by[(v, n)] for n in rounds if (v, n) in by]
        if not mine:
            continue
        last = mine[-1]
        reached = next((p.interactions for p in mine if p.rate >= goals.target), None)
        row: dict[str, Any] = {"variant": v, "learnable": learnable, "reached": reached, "last": last.rate,
                               "after": last.interactions}
        if learnable:
            row["learned"] = reached is not None and reached <= goals.within
            row["kept"] = last.rate >= goals.target
        else:
            row["learned"] = None
            row["kept"] = last.rate > r.base.rate
        if _method(v) == "combined" and parts:
            held = [n for n in rounds if (v, n) in by and all(
                (o, n) in by and by[(v, n)].rate >= by[(o, n)].rate for o in parts)]
            row["vs_parts"] = [len(held), len(rounds)]
            row["vs_parts_ok"] = len(held) == len(rounds)
        else:
            row["vs_parts"] = row["vs_parts_ok"] = None
        q = last.quality(base_share)
        row["bigram_ratio"] = q["bigram_ratio"]
        row["bigram_ok"] = q["bigram_ratio"] is None or q["bigram_ratio"] >= goals.bigram_ratio
        row["looping"] = [looping(p.answers) for p in mine]
        row["loops_ok"] = not any(row["looping"])
        if last.base_logprob is not None and r.base.base_logprob is not None:
            row["logprob_drop"] = last.base_logprob - r.base.base_logprob
            row["logprob_ok"] = row["logprob_drop"] >= -goals.logprob_margin
        else:
            row["logprob_drop"] = row["logprob_ok"] = None
        checks = [row[k] for k in ("learned", "kept", "vs_parts_ok", "bigram_ok", "loops_ok", "logprob_ok")]
        row["met"] = all(c is not False for c in checks) and row["logprob_ok"] is not None
        rows.append(row)
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


async def _probe(url: str, key: str, questions: list[str], preference: str, max_tokens: int,
                 temperature: float = 0.0, samples: int = 1, asked: list[str] | None = None) -> ProbeResult:
    users = GatewayUsers(url, key)
    try:
        return await users.probe(questions, [PERSONAS[preference]], max_tokens, temperature, samples,
                                 asked=asked)
    finally:
        await users.close()


def _sampled(url: str, key: str, questions: list[str], preference: str,
             cfg: PersonalBenchConfig, asked: list[str] | None = None) -> dict[str, float | None]:
    """Probe fields of answers sampled as users get them: their satisfaction and the share of
    them that loop (None when not asked for)."""
    if not cfg.probe_samples:
        return {"sampled_rate": None, "sampled_looping": None}
    result = asyncio.run(_probe(url, key, questions, preference, cfg.probe_max_tokens, cfg.temperature,
                                cfg.probe_samples, asked))
    return {"sampled_rate": result.satisfaction,
            "sampled_looping": looping(result.answers) / len(result.answers)}


async def _serving(url: str, key: str) -> int:
    users = GatewayUsers(url, key)
    try:
        return await users.serving_version()
    finally:
        await users.close()


def run_preference(settings: Settings, cfg: PersonalBenchConfig, preference: str, console: Console) -> PreferenceResult:
    import random

    persona = PERSONAS[preference]
    ns, out, model, key, parts = launch(settings, f"bp{_slug(preference)[:8]}", f"bench personal · {preference}",
                                        cfg, console, {}, teacher=True)
    child = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"namespace": ns})})
    runs = {v.name: f"bench-{_slug(v.name)}" for v in cfg.variants}
    ports = {v.name: cfg.port + i for i, v in enumerate(cfg.variants)}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    served = cfg.variants[0].name
    _, questions = split_questions()
    hinted_questions = [hinted_text(q, persona.corrections[0], settings.processors.hint_placement)
                        for q in questions]
    result: PreferenceResult | None = None
    try:
        # a teacher that follows the policy (processors.teacher_policy=current) follows the served run
        parts.start("processors", ["process", "all"], {"NEXTSTATE_SERVING__CHECKPOINT_RUN": runs[served]})
        for v in cfg.variants:
            slug = _slug(v.name)
            parts.start(f"gateway-{slug}", ["gateway"], {
                "NEXTSTATE_SERVING__CHECKPOINT_RUN": runs[v.name], "NEXTSTATE_GATEWAY__PORT": str(ports[v.name]),
                "NEXTSTATE_GATEWAY__SPOOL_DIR": str(out / f"spool-{slug}")})
            parts.start(f"learner-{slug}", ["learn", "--run", runs[v.name]],
                        {"NEXTSTATE_LEARNER__METHOD": v.method, **v.env})
        for url in urls.values():
            _wait_healthy(url, parts)
        base = asyncio.run(_probe(urls[served], key, questions, preference, cfg.probe_max_tokens))
        hinted = asyncio.run(_probe(urls[served], key, hinted_questions, preference,
                                    cfg.probe_max_tokens, asked=questions))
        result = PreferenceResult(
            preference,
            Probe("base", 0, 0, base.satisfaction, base.answers,
                  **_sampled(urls[served], key, questions, preference, cfg)),
            Probe("base+hint", 0, 0, hinted.satisfaction, hinted.answers,
                  **_sampled(urls[served], key, hinted_questions, preference, cfg, questions)))
        console.print(f"  {preference}: base {base.satisfaction:.2f}, hint-conditioned {hinted.satisfaction:.2f}"
                      + (f"; sampled {result.base.sampled_rate:.2f} and {result.hinted.sampled_rate:.2f}"
                         if cfg.probe_samples else ""))
        rng = random.Random(cfg.seed)
        train, _ = split_questions()
        plan = [train[rng.randrange(len(train))] for _ in range(cfg.interactions)]
        size = cfg.round_sessions or len(plan)

        async def talk(chunk: list[str]) -> int:
            users = GatewayUsers(urls[served], key, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
            done = 0
            try:
                for start in range(0, len(chunk), cfg.concurrency):
                    batch = chunk[start:start + cfg.concurrency]
                    done += len(await asyncio.gather(*(users.session(persona, q, rng) for q in batch)))
            finally:
                await users.close()
            return done

        for first in range(0, len(plan), size):
            result.sessions += asyncio.run(talk(plan[first:first + size]))
            versions = _await_runs(child, cfg, runs, urls, key, parts)
            probes = asyncio.run(_probe_all(urls, key, questions, preference, cfg.probe_max_tokens))
            for name, p in probes.items():
                result.probes.append(Probe(name, result.sessions, p.policy_version, p.satisfaction, p.answers,
                                           **_sampled(urls[name], key, questions, preference, cfg)))
            console.print(f"  {preference} after {result.sessions}: " + ", ".join(
                f"{escape(p.variant)} v{p.version}{'' if versions.get(p.variant) else ' (behind)'} {p.rate:.2f}"
                + (f" (sampled {p.sampled_rate:.2f})" if p.sampled_rate is not None else "")
                for p in result.probes[-len(probes):]))
    except Exception as exc:   # keep what was measured; say what failed
        from infra.cli.demo import _describe_failure

        if result is None:
            empty = Probe("base", 0, 0, float("nan"), [])
            result = PreferenceResult(preference, empty, empty)
        result.failure = _describe_failure(exc, f"benchmarking {preference}", parts.directory)
        console.print(f"[red]{result.failure}[/red]", markup=True, highlight=False)
    finally:
        parts.stop(grace_s=60)
        if not cfg.keep_checkpoints:
            try:
                _remove_checkpoints(settings, ns)
            except Exception as exc:   # what was measured matters more than the disk space
                console.print(f"could not remove the checkpoints of {ns}: {exc}", markup=False)
    return result


def _remove_checkpoints(settings: Settings, namespace: str) -> None:
    """The runs' checkpoint objects (a few GB per preference); the events stay in the log."""
    from minio.deleteobjects import DeleteObject

    from infra.storage import storage_client

    client = storage_client(settings.storage)
    bucket = settings.learner.bucket or settings.storage.bucket   # where the learners wrote them
    objects = [DeleteObject(o.object_name) for o in
               client.list_objects(bucket, prefix=namespace.rstrip(".") + "/", recursive=True)]
    for error in client.remove_objects(bucket, objects):
        print(f"could not remove {error.name}: {error.message}")


def _await_runs(settings: Settings, cfg: PersonalBenchConfig, runs: dict[str, str], urls: dict[str, str],
                key: str, parts: Parts) -> dict[str, bool]:
    """Wait until every run has trained on every sample so far and its gateway serves that
    checkpoint (or round_wait_s passes); which runs got there."""
    deadline = time.monotonic() + cfg.round_wait_s
    want: dict[str, int] = {}
    ready: dict[str, bool] = {name: False for name in runs}
    variants = {v.name: v for v in cfg.variants}
    learners = {name: v.learner() for name, v in variants.items()}
    from infra.eventlog import read_log

    while time.monotonic() < deadline and not all(ready.values()):
        parts.check()
        log = read_log(settings, timeout=5.0) if len(want) < len(runs) else []
        for name, run in runs.items():
            if ready[name]:
                continue
            if name not in want:
                version = _caught_up(settings, variants[name].method, run=run, log=log,
                                     learner=learners[name])
                if version is not None:
                    want[name] = version
            if name in want and asyncio.run(_serving(urls[name], key)) >= want[name]:
                ready[name] = True
        time.sleep(2)
    return ready


async def _probe_all(urls: dict[str, str], key: str, questions: list[str], preference: str,
                     max_tokens: int) -> dict[str, ProbeResult]:
    names = list(urls)
    results = await asyncio.gather(*(_probe(urls[n], key, questions, preference, max_tokens) for n in names))
    return dict(zip(names, results))


def _score_base_logprobs(model: str, results: list[PreferenceResult]) -> None:
    """The base model's mean per-token logprob of every probe's answers (greedy answers, each
    scored after the plain probe question, the hinted base's too), with the base weights loaded
    here."""
    from infra.settings import ServingSettings
    from serving.chat import normalize_messages, render_prompt
    from serving.local import LocalEngine

    engine = LocalEngine(ServingSettings(), model_dir=model)
    tok = engine.tokenizer
    _, questions = split_questions()
    prompts = [render_prompt(tok, normalize_messages([{"role": "user", "content": q}]), None) for q in questions]

    async def mean_logprob(answers: list[str]) -> float | None:
        total, count = 0.0, 0
        for prompt, answer in zip(prompts, answers):
            ids = tok.encode(answer, add_special_tokens=False)
            if not ids:
                continue
            scores = await engine.score(prompt, ids)
            total += sum(scores.logprobs)
            count += len(ids)
        return total / count if count else None

    async def all_of_them() -> None:
        try:
            for r in results:
                for p in [r.base, r.hinted, *r.probes]:
                    if p.answers and p.base_logprob is None:
                        p.base_logprob = await mean_logprob(p.answers)
        finally:
            await engine.close()

    asyncio.run(all_of_them())


def run_personal_bench(settings: Settings, cfg: PersonalBenchConfig, console: Console) -> list[PreferenceResult]:
    from serving.models import resolve_model

    import socket

    for i in range(len(cfg.variants)):   # another server there would answer in our gateways' place
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", cfg.port + i)) == 0:
                raise ConfigError(f"port {cfg.port + i} is taken; give --port (the benchmark needs "
                                  f"{len(cfg.variants)} consecutive free ports)")
    started = time.monotonic()
    out = cfg.out_dir / time.strftime("%Y%m%d%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = out
    learner = settings.learner
    console.print(f"learning settings (defaults unless the environment sets them): method served "
                  f"{cfg.variants[0].name}, lr {learner.lr or 'default'}, grad_accum {learner.grad_accum}, adv_norm {learner.adv_norm}, "
                  f"token_budget {learner.token_budget}, w_rl {learner.loss.w_rl}, w_opd {learner.loss.w_opd}, "
                  f"kl_coef {learner.loss.kl_coef if learner.loss.kl_coef is not None else 'default'}, "
                  f"teacher term's anchor {learner.loss.opd_anchor or 'by method'}, teacher {settings.processors.teacher_model} "
                  f"{settings.processors.teacher_policy} (hint {settings.processors.hint_placement} the message)", markup=False)
    results: list[PreferenceResult] = []
    for preference in cfg.preferences:
        results.append(run_preference(settings, cfg, preference, console))
        # what was measured so far survives an interrupted run (answers not yet scored)
        _save(cfg, results, out, time.monotonic() - started)
    console.print("scoring the answers with the base model")
    try:
        _score_base_logprobs(str(resolve_model(cfg.model, settings.serving.cache_dir)), results)
    except Exception as exc:   # report what was measured without the logprobs
        console.print(f"could not score the answers with the base model: {exc}", markup=False)
    report(cfg, results, out, console, time.monotonic() - started)
    return results


def report(cfg: PersonalBenchConfig, results: list[PreferenceResult], out: Path, console: Console,
           elapsed_s: float) -> None:
    names = [v.name for v in cfg.variants]   # `opd[epochs=1]` is no markup: escaped where shown
    table = Table(title="first-response satisfaction on 16 held-out probes (greedy, side turns)")
    for col in ("preference", "base", "base+hint", "after", *map(escape, names)):
        table.add_column(col, justify="right" if col != "preference" else "left")
    sampled = Table(title="the same, sampled as users get them (temperature "
                          f"{cfg.temperature}, {cfg.probe_samples} answers per probe)")
    for col in ("preference", "base", "base+hint", "after", *map(escape, names)):
        sampled.add_column(col, justify="right" if col != "preference" else "left")
    quality = Table(title="answer quality on the probes after the last round (base model for reference)")
    for col in ("preference", "run", "rate", "bigram share ×base", "looping answers", "looping sampled",
                "non-answers", "base logprob/token", "Δ vs base answers"):
        quality.add_column(col, justify="right" if col not in ("preference", "run") else "left")
    for r in results:
        rounds = sorted({p.interactions for p in r.probes})
        for i, n in enumerate(rounds):
            row = {p.variant: p for p in r.probes if p.interactions == n}
            table.add_row(r.preference if i == 0 else "", f"{r.base.rate:.2f}" if i == 0 else "",
                          f"{r.hinted.rate:.2f}" if i == 0 else "", str(n),
                          *(f"{row[v].rate:.2f} (v{row[v].version})" if v in row else "-" for v in names))
            sampled.add_row(r.preference if i == 0 else "", _fmt(r.base.sampled_rate, digits=2) if i == 0 else "",
                            _fmt(r.hinted.sampled_rate, digits=2) if i == 0 else "", str(n),
                            *(_fmt(row[v].sampled_rate, digits=2) if v in row else "-" for v in names))
        if not rounds:
            table.add_row(r.preference, f"{r.base.rate:.2f}", f"{r.hinted.rate:.2f}", "-", *("-" for _ in names))
        base_share = distinct_bigram_share(r.base.answers)
        base_q = r.base.quality(base_share)
        quality.add_row(r.preference, "base", f"{r.base.rate:.2f}", "1.00", str(base_q["looping"]),
                        _fmt(r.base.sampled_looping, digits=2), f"{base_q['unanswered']:.2f}",
                        _fmt(base_q["base_logprob"]), "")
        if r.hinted.answers:
            hint_q = r.hinted.quality(base_share)
            quality.add_row("", "base+hint", f"{r.hinted.rate:.2f}", _fmt(hint_q["bigram_ratio"]),
                            str(hint_q["looping"]), _fmt(r.hinted.sampled_looping, digits=2),
                            f"{hint_q['unanswered']:.2f}", _fmt(hint_q["base_logprob"]),
                            _fmt(_drop(hint_q["base_logprob"], base_q["base_logprob"]), signed=True))
        last = max(rounds, default=None)
        for p in (p for p in r.probes if p.interactions == last):
            q = p.quality(base_share)
            drop = _drop(q["base_logprob"], base_q["base_logprob"])
            quality.add_row("", escape(p.variant), f"{p.rate:.2f}", _fmt(q["bigram_ratio"]), str(q["looping"]),
                            _fmt(p.sampled_looping, digits=2), f"{q['unanswered']:.2f}", _fmt(q["base_logprob"]),
                            _fmt(drop, signed=True))
    _save(cfg, results, out, elapsed_s)
    console.print(table)
    if cfg.probe_samples:
        console.print(sampled)
    console.print(quality)
    console.print(goals_table(cfg, results))
    _plot(cfg, results, out / "curves.png")
    console.print(f"{elapsed_s / 60:.0f} min; results in {out / 'results.json'}, curves in {out / 'curves.png'}")


def _drop(value: float | None, base: float | None) -> float | None:
    return value - base if value is not None and base is not None else None


def _mark(ok: bool | None) -> str:
    return "" if ok is None else " ✓" if ok else " ✗"


def goals_table(cfg: PersonalBenchConfig, results: list[PreferenceResult]) -> Table:
    g = cfg.goals
    names = [v.name for v in cfg.variants]
    table = Table(title=f"goals: greedy ≥ {g.target} within {g.within} interactions and after the last round "
                        f"(where the hinted base reaches {g.learnable}; elsewhere above the base), combined ≥ "
                        f"rl and opd in every round, no looping answer in any round, word pairs ≥ "
                        f"{g.bigram_ratio}× the base's, base logprob at most {g.logprob_margin} below")
    for col in ("preference", "run", f"first ≥ {g.target} at", "last round", "≥ rl, opd (rounds)",
                "word pairs ×base", "looping answers by round", "Δ base logprob", "met"):
        table.add_column(col, justify="right" if col not in ("preference", "run") else "left")
    for r in results:
        for i, row in enumerate(check_goals(r, names, g)):
            vs = row["vs_parts"]
            table.add_row(
                r.preference if i == 0 else "", escape(row["variant"]),
                ("-" if row["reached"] is None else str(row["reached"])) + _mark(row["learned"]),
                f"{row['last']:.2f} ({row['after']})" + _mark(row["kept"]),
                ("-" if vs is None else f"{vs[0]}/{vs[1]}") + _mark(row["vs_parts_ok"]),
                _fmt(row["bigram_ratio"], digits=2) + _mark(row["bigram_ok"]),
                " ".join(map(str, row["looping"])) + _mark(row["loops_ok"]),
                _fmt(row["logprob_drop"], signed=True, digits=2) + _mark(row["logprob_ok"]),
                "yes" if row["met"] else "no")
    return table


def load_results(path: Path) -> tuple[PersonalBenchConfig, list[PreferenceResult], float]:
    """A results.json written by this benchmark, back as the report's inputs, and how long that
    run took in seconds."""
    try:
        data = json.loads(path.read_text())
        fields = set(Probe.__dataclass_fields__)

        def probe(d: dict[str, Any]) -> Probe:
            return Probe(**{k: v for k, v in d.items() if k in fields})

        results = [PreferenceResult(d["preference"], probe(d["base"]), probe(d["hinted"]),
                                    [probe(p) for p in d["probes"]], d.get("sessions", 0), d.get("failure"))
                   for d in data["preferences"]]
        variants = tuple(Variant(name, _method(name)) for name in data["variants"])
        cfg = PersonalBenchConfig(preferences=tuple(r.preference for r in results), variants=variants,
                                  interactions=data.get("interactions", 48),
                                  round_sessions=data.get("round_sessions", 12), model=data.get("model"),
                                  out_dir=path.parent)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a results.json of `bench personal`: {exc}") from exc
    return cfg, results, float(data.get("elapsed_s") or 0.0)


def rejudged(path: Path) -> tuple[int, int]:
    """(how many probe answers of a results.json personas.answers judges differently now than
    when the run was made, net per probe; how many it held with a stored judgement). A run's
    rates were judged by the users of its day; the non-answer column is computed again."""
    questions = split_questions()[1]
    changed = held = 0
    for pref in json.loads(path.read_text())["preferences"]:
        for probe in [pref["base"], *pref["probes"]]:
            answers = probe.get("answers") or []
            if "unanswered" not in probe or not answers:
                continue
            now = unanswered(questions, answers)
            changed += round(abs(now - probe["unanswered"]) * len(answers))
            held += len(answers)
    return changed, held


def report_again(settings: Settings, path: Path, console: Console) -> list[PreferenceResult]:
    """`--report`: a finished (or interrupted) run's tables and goals from its results.json,
    scoring with the base model what was not scored yet; the file is rewritten with it. Says so
    when the answer rule now judges some of its answers differently (`rejudged`)."""
    from serving.models import resolve_model

    cfg, results, elapsed_s = load_results(path)
    changed, held = rejudged(path)
    then = "its rates are as its users judged them, its non-answer column as the rule judges now"
    if not held:
        console.print(f"this run was made before personas.answers judged its answers: {then}")
    elif changed:
        console.print(f"{changed} of its {held} probe answers are judged differently by personas.answers "
                      f"now than when it ran: {then}")
    if any(p.answers and p.base_logprob is None for r in results for p in [r.base, r.hinted, *r.probes]):
        console.print("scoring the answers with the base model")
        _score_base_logprobs(str(resolve_model(cfg.model, settings.serving.cache_dir)), results)
    report(cfg, results, path.parent, console, elapsed_s)
    return results


def _save(cfg: PersonalBenchConfig, results: list[PreferenceResult], out: Path, elapsed_s: float) -> None:
    """results.json: every preference measured so far, its probes and their answer quality."""
    data = []
    for r in results:
        base_share = distinct_bigram_share(r.base.answers)
        data.append({"preference": r.preference, "sessions": r.sessions, "failure": r.failure,
                     "base": {**r.base.__dict__, **r.base.quality(base_share)}, "hinted": r.hinted.__dict__,
                     "probes": [{**p.__dict__, **p.quality(base_share)} for p in r.probes],
                     "goals": check_goals(r, [v.name for v in cfg.variants], cfg.goals)})
    (out / "results.json").write_text(json.dumps({"variants": [v.name for v in cfg.variants],
                                                  "interactions": cfg.interactions,
                                                  "round_sessions": cfg.round_sessions,
                                                  "goal_settings": cfg.goals.__dict__, "model": cfg.model,
                                                  "elapsed_s": elapsed_s, "preferences": data}, indent=1))


def _fmt(value: float | None, signed: bool = False, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _plot(cfg: PersonalBenchConfig, results: list[PreferenceResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(results)), figsize=(4.2 * max(1, len(results)), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        for v in cfg.variants:
            pts = sorted((p.interactions, p.rate) for p in r.probes if p.variant == v.name)
            ax.plot([0, *(x for x, _ in pts)], [r.base.rate, *(y for _, y in pts)], "o-", label=v.name)
        ax.axhline(r.hinted.rate, linestyle="--", color="grey", label="base + hint (OPD's ceiling)")
        ax.set_title(r.preference)
        ax.set_xlabel("interactions")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("first-response satisfaction")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
