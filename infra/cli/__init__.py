"""The one `nextstate` command line. Each command only parses, builds settings and calls a loop.

Heavy imports (torch, transformers, faust) happen inside the commands that need them, so
`nextstate --help` and the stack commands start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from infra.cli.common import console, fail
from infra.cli.envs import register as register_envs
from infra.cli.gateway import register as register_gateway
from infra.cli.learner import register as register_learner
from infra.cli.processors import register as register_processors
from infra.cli.serving import register as register_serving
from infra.cli.stack import stack_app
from infra.errors import NextstateError
from infra.settings import load_settings, masked

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="nextstate: online RL from the next state that follows every action.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect settings.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print numbers.")
app.add_typer(stack_app, name="stack", help="The local Kafka, schema registry and MinIO.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
register_learner(app, bench_app)
register_serving(app, bench_app)
register_processors(app, bench_app)
register_gateway(app, bench_app)
register_envs(app, bench_app)



@app.callback()
def _quiet_clients() -> None:
    """Per-request INFO lines of the HTTP clients (registry lookups) drown the real logs."""
    import logging

    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)




@config_app.command("show")
def config_show() -> None:
    """Print the effective settings, secrets masked."""
    try:
        settings = load_settings()
    except NextstateError as exc:
        fail(exc)
    console.print_json(json.dumps(masked(settings), default=str))
    from learner.trainer import resolve_device
    from processors.teacher import describe_teacher
    from schemas.methods import rule

    device = resolve_device(settings.learner.device).type
    lp = settings.learner
    trains = f"LoRA (rank {lp.lora_rank})" if lp.uses_lora(device) else "full weights"
    lr_note = "" if lp.lr is not None else " (the default for that)"
    loss = lp.loss_for(device)
    where = (f"the first {loss.kl_start_tokens} tokens of each response" if loss.kl_on == "start"
             else f"{loss.kl_on} tokens")
    kl = f"{loss.kl_coef:g} ({loss.kl_form}, {where})" if loss.kl_coef > 0 else "0"
    if loss.flat_coef > 0:
        kl += (f", and no flatter than the base × {loss.flat_coef:g} (its next-token entropy at most "
               f"{loss.flat_margin:g} nats above the base's)")
    teacher_t = "" if loss.opd_temperature == 1 else (
        f" with the teacher at temperature {loss.opd_temperature:g}"
        + (f" on the first {loss.opd_temperature_tokens} tokens of each response" if loss.opd_temperature_tokens else ""))
    if loss.opd_guidance and loss.opd_anchor == "policy":
        teacher_t += (f", aimed at the policy itself moved {loss.opd_guidance:g}× along what the hint changes "
                      f"(the hinted teacher's log-ratio to the base, capped at ±{loss.opd_guidance_cap:g})")
    elif loss.opd_guidance:
        teacher_t += (f", the teacher taken {loss.opd_guidance:g}× further from the base along what the hint "
                      f"changed (each bin's log-ratio to the base capped at ±{loss.opd_guidance_cap:g})")
    if loss.opd_norm == "teacher":
        teacher_t += ", averaged over the tokens of the samples with a teacher, not the step's"
    if loss.balance == "approval" and rule(lp.method).reward_term and rule(lp.method).teacher_term:
        teacher_t += (", weighed against the users' verdicts by how often they approve (s, over the last "
                      f"{lp.adv_window} verdicts): the teacher term × min(1, 2(1 − s)), the verdicts × min(1, 2s)")
    baseline = {"running": f"the last {lp.adv_window} rewards of any step", "batch": "the step's mean and spread",
                "group": "their task group's mean and spread",
                "step": "their task group's mean and spread at the same step", "none": "no baseline"}[lp.adv_norm]
    g = lp.loop_guard
    guard = (f"the policy's greedy answers to {g.prompts} of each step's contexts and {g.recall} earlier ones are "
             f"checked for loops (one {g.ngram}-token sequence {g.repeats} times, or one sentence three times) and "
             f"their repeats pushed down × {g.coef:g}"
             + (f", with the first {g.first} token(s) each looping answer began with" if g.first else "")
             + (f"; the updated weights are checked on the same contexts and repaired by up to {g.after} more "
                f"pass(es) before they are published" if g.after else "")
             if g.prompts and g.coef else "the policy's greedy answers are not checked for loops")
    a = lp.approved
    if a.replay and rule(lp.method).reward_term:
        guard += (f"; each step trains up to {a.replay} of the newest {a.keep} approved answers again "
                  f"(advantage {a.advantage:g})")
    console.print(f"decided here: the learner trains on {device} with {trains} at lr "
                  f"{lp.learning_rate(device):g}{lr_note}, {lp.updates_per_step(device)} update(s) per step's "
                  f"samples, rewards against {baseline}, negative advantages × {loss.neg_weight:g} and KL to the "
                  f"base {kl}; {guard}; the teacher term is "
                  f"{lp.loss.opd_form}{teacher_t}; the hint stage's teacher is {describe_teacher(settings)}, reading the "
                  f"hint {settings.processors.hint_placement} the user's message; a rejected answer's approved "
                  f"redo {'trains' if settings.processors.revisions and lp.revisions and rule(lp.method).reward_term else 'does not train'} "
                  f"in the rejected answer's context (revisions){_answers(settings)}", markup=False)


def _answers(settings: Any) -> str:
    """What `config show` says of the teacher's own answers (processors.teacher_answers)."""
    from schemas.methods import rule

    lp = settings.learner
    if not settings.processors.teacher_answers:
        return ""
    if lp.teacher_answers and rule(lp.method).reward_term:
        spread = ("" if lp.teacher_answer_credit == "flat"
                  else ", each token times the teacher's logprob lead over the policy (teacher_answer_credit gap)")
        fade = (f", halved every {lp.teacher_answers_halflife:g} answers trained (teacher_answers_halflife)"
                if lp.teacher_answers_halflife else "")
        return (f"; the teacher also answers each hinted turn itself, trained in the student's context at "
                f"advantage {lp.teacher_answers:g} (teacher answers){spread}{fade}")
    return "; the teacher also answers each hinted turn itself, not trained here (learner.teacher_answers)"


@app.command()
def provision(namespace: Optional[str] = typer.Option(None, help="topic prefix; default from settings"),
              bucket: Optional[str] = typer.Option(None, help="checkpoint bucket; default from settings")) -> None:
    """Create every topic, register every schema, and create the checkpoint bucket."""
    from infra.provision import provision as run
    from processors.topology import control_topics

    try:
        s = load_settings()
        ns = s.kafka.namespace if namespace is None else namespace
        result = run(s.kafka, s.registry, s.storage, ns, bucket, control=control_topics(ns))
    except NextstateError as exc:
        fail(exc)
    for topic, state in result["topics"].items():
        console.print(f"topic   {topic:<40} {state}")
    for subject, schema_id in result["schemas"].items():
        console.print(f"schema  {subject:<40} id {schema_id}")
    b = result["bucket"]
    console.print(f"bucket  {b['name']:<40} {'created' if b['created'] else 'exists'}")


@bench_app.command("codec")
def bench_codec(records: int = typer.Option(5000, help="records per measurement"),
                response_tokens: int = typer.Option(1000),
                prompt_tokens: int = typer.Option(1000),
                broker: bool = typer.Option(True, help="also measure produce+consume through Kafka")) -> None:
    """TurnRecorded through the registry-bound Avro serializer vs orjson, and through Kafka."""
    from infra.bench_codec import run_codec_bench

    try:
        run_codec_bench(load_settings(), records, prompt_tokens, response_tokens, broker, console)
    except NextstateError as exc:
        fail(exc)


@bench_app.command("hints")
def bench_hints(preferences: str = typer.Option("formal,brief,plain,curious",
                                                help="hidden preferences: brief, plain, curious, metric, lowercase, formal"),
                placements: str = typer.Option("before,after", help="where the teacher reads the hint"),
                out: Optional[Path] = typer.Option(None, help="also write the rates as JSON here")) -> None:
    """What the hint-conditioned base model (OPD's teacher) meets of each preference, for each
    place the hint can go in its context: the ceiling of what OPD can distil."""
    from infra.cli.bench_hints import run_hints_bench

    try:
        run_hints_bench(load_settings(), [p.strip() for p in preferences.split(",") if p.strip()],
                        [p.strip() for p in placements.split(",") if p.strip()], out, console)
    except NextstateError as exc:
        fail(exc)


@bench_app.command("teacher")
def bench_teacher(namespace: str = typer.Option(..., help="the namespace whose samples to read "
                                                          "(a `bench personal` run prints it)"),
                  tokens: str = typer.Option(r"^'(s|t|re|ll|ve|m|d)$|!",
                                             help="a regular expression for the tokens the user objects to "
                                                  "(the default: contractions and '!', what `formal` rejects)")) -> None:
    """Where in the policy's answers the hinted teacher disagrees with it: the teacher − policy
    logprob gap at the tokens matching --tokens against every trained token."""
    from infra.cli.bench_teacher import run_teacher_bench

    try:
        run_teacher_bench(load_settings(), namespace, tokens, console)
    except NextstateError as exc:
        fail(exc)


@bench_app.command("personal")
def bench_personal(preferences: str = typer.Option(",".join(("brief", "lowercase", "curious", "formal")),
                                                   help="hidden preferences, one population each: "
                                                        "brief, plain, curious, metric, lowercase, formal"),
                   variant: Optional[list[str]] = typer.Option(None, help="a learner run: METHOD or "
                                                               "METHOD:name=value,... (learner settings, dotted); "
                                                               "repeat; the first is served; default combined, rl, opd"),
                   interactions: int = typer.Option(48, min=1, help="user sessions per preference"),
                   round_sessions: int = typer.Option(12, min=0, help="sessions per round; every run catches up "
                                                                     "and is probed after each (0: one round)"),
                   model: Optional[str] = typer.Option(None, help="model; default SmolLM2-135M-Instruct (embedded)"),
                   seed: int = typer.Option(0),
                   probe_samples: int = typer.Option(4, min=0, help="besides the greedy probes, answers "
                                                                    "sampled per probe as users get them (0: none)"),
                   port: int = typer.Option(30300, help="the first gateway's port (one per run, consecutive)"),
                   keep_checkpoints: bool = typer.Option(False, help="leave the runs' checkpoints in the object "
                                                                     "store (a few GB per preference) to study "
                                                                     "them later; removed by default"),
                   report: Optional[Path] = typer.Option(None, help="print an earlier run's tables and goals "
                                                                    "from its results.json (nothing is run)")) -> None:
    """Does the personal loop learn a hidden preference with the defaults? Base and hint-conditioned
    rates, each run's curve, whether the answers stay answers, and which goals each run met."""
    import signal

    from infra.cli.bench_personal import PersonalBenchConfig, Variant, report_again, run_personal_bench
    from producers.simulated.personas import PERSONAS

    if report is not None:
        try:
            report_again(load_settings(), report, console)
        except NextstateError as exc:
            fail(exc)
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)   # like Ctrl-C: every part the benchmark started is stopped

    signal.signal(signal.SIGTERM, stop)

    prefs = tuple(p.strip() for p in preferences.split(",") if p.strip())
    unknown = [p for p in prefs if p not in PERSONAS]
    if unknown or not prefs:
        fail(f"unknown preference(s) {unknown}; known: {', '.join(PERSONAS)}")
    cfg = PersonalBenchConfig(preferences=prefs, interactions=interactions, round_sessions=round_sessions,
                              model=model, seed=seed, port=port, probe_samples=probe_samples,
                              keep_checkpoints=keep_checkpoints)
    if variant:
        try:
            cfg.variants = tuple(Variant.parse(v) for v in variant)
        except ValueError as exc:
            fail(str(exc))
    try:
        run_personal_bench(load_settings(), cfg, console)
    except NextstateError as exc:
        fail(exc)


@app.command()
def audit(some_id: str = typer.Argument(..., help="a sample, turn, transition, judgement or session id"),
          namespace: Optional[str] = typer.Option(None, help="topic prefix; default from settings")) -> None:
    """Print the full lineage: turn, next state, every judge vote, the hint, the sample, the checkpoint."""
    from infra.cli.audit import lineage, render, resolve
    from infra.eventlog import read_log

    try:
        log = read_log(load_settings(), namespace)
    except NextstateError as exc:
        fail(exc)
    turn_ids = resolve(log, some_id)
    if not turn_ids:
        console.print(f"[red]no event or session {some_id!r} in the log ({len(log)} events read)[/red]")
        raise typer.Exit(1)
    for turn_id in turn_ids:
        render(lineage(log, turn_id), console)


@app.command("up")
def up_all(stack: bool = typer.Option(True, help="start the local stack too (off when Kafka etc. run elsewhere)")) -> None:
    """Start every part (stack, engine + gateway, processors, learner) as supervised processes."""
    from infra.cli.supervisor import parts_dir, start_supervisor
    from infra.provision import provision as run_provision
    from infra.stack import up as stack_up
    from processors.topology import control_topics

    try:
        s = load_settings()
        if stack:
            stack_up(s.stack, s.storage)
        run_provision(s.kafka, s.registry, s.storage, control=control_topics(s.kafka.namespace))
    except NextstateError as exc:
        fail(exc)
    pid = start_supervisor(s)
    console.print(f"supervisor pid {pid}; parts log to {parts_dir(s)}; `nextstate ps` shows them")


@app.command("down")
def down_all(stack: bool = typer.Option(False, help="stop the local stack too")) -> None:
    """Stop every supervised part (and, with --stack, the local stack)."""
    from infra.cli.supervisor import stop_supervisor
    from infra.stack import down as stack_down

    s = load_settings()
    console.print("parts stopped" if stop_supervisor(s) else "no parts were running")
    if stack:
        stack_down(s.stack, s.storage)
        console.print("stack stopped")


@app.command("ps")
def ps() -> None:
    """Show each supervised part: state, pid, restarts, last exit."""
    from rich.table import Table

    from infra.cli.supervisor import read_states, supervisor_running

    s = load_settings()
    table = Table(title=f"nextstate parts (supervisor {'running' if supervisor_running(s) else 'stopped'})")
    for col in ("part", "state", "pid", "starts", "last exit"):
        table.add_column(col)
    for name, st in read_states(s).items():
        table.add_row(name, st["state"], str(st["pid"] or "-"), str(st["starts"]), st["last_exit"])
    console.print(table)


@app.command("supervise", hidden=True)
def supervise_cmd() -> None:
    """Run the supervisor in the foreground (what `nextstate up` starts detached)."""
    from infra.cli.supervisor import supervise

    supervise(load_settings())


@app.command()
def ops(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(30080),
        namespace: Optional[str] = typer.Option(None, help="topic prefix; default from settings")) -> None:
    """Serve only the ops view (sessions, reward decisions, curves) behind the gateway's API keys."""
    import uvicorn

    from infra.cli.ops import ops_app

    try:
        app_ = ops_app(load_settings(), namespace)
    except NextstateError as exc:
        fail(exc)
    console.print(f"ops view on http://{host}:{port}/ops/")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def soak(minutes: float = typer.Option(30.0, help="how long the load runs"),
         users: int = typer.Option(4, help="simulated users talking at once"),
         think_s: float = typer.Option(1.0, help="each user's pause between requests"),
         fault_every_s: float = typer.Option(60.0, help="seconds between faults"),
         faults: Optional[int] = typer.Option(None, help="how many faults (default: as many as fit)"),
         stack_faults: bool = typer.Option(True, help="also restart the broker and stop MinIO and the registry"),
         pause_s: float = typer.Option(20.0, help="how long MinIO / the registry stay stopped"),
         model: Optional[str] = typer.Option(None, help="model spec; default: the embedded default"),
         port: int = typer.Option(30070, help="the soak's gateway port"),
         seed: int = typer.Option(7),
         out: Path = typer.Option(Path("out/soak"), help="results and logs go under here")) -> None:
    """The loop under load while every part is killed in turn; then the books: nothing answered
    lost, nothing recorded or trained twice (see infra/cli/soak.py)."""
    from infra.cli.soak import SoakConfig, print_result, run_soak

    cfg = SoakConfig(minutes=minutes, users=users, think_s=think_s, fault_every_s=fault_every_s, faults=faults,
                     stack_faults=stack_faults, pause_s=pause_s, model=model, port=port, seed=seed, out_dir=out)
    try:
        result = run_soak(load_settings(), cfg, console)
    except NextstateError as exc:
        fail(exc)
    print_result(result, console)
    if not result.get("ok"):
        raise typer.Exit(1)


@app.command()
def demo(track: str = typer.Option("personal", help="personal (simulated users) or toolcall (a general agent "
                                                    "with a Python tool, groups of rollouts)"),
         sessions: int = typer.Option(48, help="personal: simulated user sessions (two turns each)"),
         concurrency: int = typer.Option(8, help="sessions (personal) or rollouts (toolcall) at once"),
         round_sessions: int = typer.Option(16, help="personal: sessions per round; the next round waits until "
                                                     "the served run has learned from this one (0: never wait)"),
         model: Optional[str] = typer.Option(None, help="model; default SmolLM2-135M-Instruct (embedded)"),
         methods: str = typer.Option("combined,rl,opd", help="personal: learner runs, comma-separated; the first is served live"),
         personas: str = typer.Option("brief", help="personal: the simulated population: brief, plain, curious, metric, lowercase, formal"),
         max_tokens: Optional[int] = typer.Option(None, min=1, help="tokens per answer (default 64; toolcall: per step, 40)"),
         rounds: int = typer.Option(3, help="toolcall: rounds of training tasks"),
         tasks_per_round: int = typer.Option(6, help="toolcall: training tasks per round"),
         group_size: int = typer.Option(4, help="toolcall: rollouts per task"),
         heldout: int = typer.Option(16, help="toolcall: held-out tasks evaluated before and after"),
         task_kinds: str = typer.Option("arithmetic,word", help="toolcall: task kinds, comma-separated"),
         compare: bool = typer.Option(True, help="toolcall: also train on an outcome-only replay and evaluate it"),
         lr: float = typer.Option(1e-3, help="learning rate of the LoRA learners"),
         seed: int = typer.Option(0),
         port: Optional[int] = typer.Option(None, help="the demo gateway's port (default 30100; toolcall 30200)")) -> None:
    """The whole loop on the embedded default: simulated users (personal) or a tool-using agent
    over groups of rollouts (toolcall); a before/after table and a PNG plot."""
    if track not in ("personal", "toolcall"):
        fail(f"--track must be personal or toolcall, got {track!r}")
    import signal

    def stop(signum: int, _frame: object) -> None:
        # like Ctrl-C: the demo's `finally` stops every part it started (no orphans)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    if track == "toolcall":
        from infra.cli.demo_toolcall import ToolcallDemoConfig, run_toolcall_demo

        tcfg = ToolcallDemoConfig(model=model, rounds=rounds, tasks_per_round=tasks_per_round, group_size=group_size,
                                  heldout=heldout, concurrency=concurrency, compare=compare, lr=lr, seed=seed,
                                  kinds=tuple(k.strip() for k in task_kinds.split(",") if k.strip()),
                                  port=port or 30200, max_tokens=max_tokens or 40)
        try:
            tstate = run_toolcall_demo(load_settings(), tcfg, console)
        except NextstateError as exc:
            fail(exc)
        if tstate.failure:
            raise typer.Exit(1)
        return
    from infra.cli.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=model, sessions=sessions, concurrency=concurrency, round_sessions=round_sessions,
                     max_tokens=max_tokens or 64,
                     methods=tuple(m.strip() for m in methods.split(",") if m.strip()), lr=lr,
                     personas=tuple(p.strip() for p in personas.split(",") if p.strip()),
                     seed=seed, port=port or 30100)
    try:
        state = run_demo(load_settings(), cfg, console)
    except NextstateError as exc:
        fail(exc)
    if state.failure:
        raise typer.Exit(1)
