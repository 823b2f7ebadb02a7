"""One frozen settings object for every nextstate process, handed out by section.

Values come from the environment (prefix ``NEXTSTATE_``, nested with ``__``, e.g.
``NEXTSTATE_KAFKA__BOOTSTRAP_SERVERS``) or an ``.env`` file. A component receives its own
section, never the whole object.

Secrets are ``SecretStr`` and print masked. With ``profile=local`` (the default, the stack that
``nextstate stack up`` starts on this machine) the stack's own development credentials are
filled in; with any other profile every secret must be given explicitly.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.errors import ConfigError
from schemas.events import HintSelection, Method, TeacherPolicy
from schemas.methods import rule


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# Closed choices: an enum or a Literal, so a wrong value is refused with the allowed ones listed.
# Names that registries in code own (engines, judges, staleness policies, lr schedules, hint
# placements) are listed here too; tests/infra/test_settings.py holds each list against its registry.
MethodName = Annotated[Method, BeforeValidator(_upper)]               # rl | opd | combined, any case
EngineName = Literal["local", "remote", "sglang"]                     # serving.engine.ENGINES
JudgeName = Literal["feedback", "llm"]                                # processors.judges
Dtype = Literal["float32", "bfloat16", "float16"]
StalenessPolicy = Literal["drop", "correct"]                          # learner.staleness.POLICIES
AdvNorm = Literal["none", "group", "step", "batch", "running"]       # learner.losses.normalisation_keys
LrSchedule = Literal["constant", "cosine", "linear"]                  # learner.trainer.LR_SCHEDULES
HintPlacement = Literal["before", "after"]                            # serving.chat.PLACEMENTS
AnswerCredit = Literal["flat", "gap"]                                 # learner.trainer.ANSWER_CREDITS


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nextstate"


def _state_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nextstate"


class Profile(StrEnum):
    LOCAL = "local"
    PRODUCTION = "production"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    namespace: str = "nextstate."
    partitions: int = Field(default=3, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # The event topics are the event store: no time-based deletion unless asked for.
    retention_ms: int = -1
    max_message_bytes: int = 8 * 1024 * 1024
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    def topic(self, name: str, namespace: str | None = None) -> str:
        return f"{self.namespace if namespace is None else namespace}{name}"

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and the admin client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username or ""
            conf["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else ""
        return conf


class RegistrySettings(_Section):
    url: str = "http://127.0.0.1:8081/apis/ccompat/v7"
    username: str | None = None
    password: SecretStr | None = None
    compatibility: str = "BACKWARD"
    # Without a timeout one stalled registry read blocks its caller for ever.
    timeout_s: float = Field(default=30.0, gt=0)

    def client_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {"url": self.url, "timeout": self.timeout_s}
        if self.username:
            secret = self.password.get_secret_value() if self.password else ""
            conf["basic.auth.user.info"] = f"{self.username}:{secret}"
        return conf


class StorageSettings(_Section):
    endpoint: str = "127.0.0.1:9000"
    access_key: str | None = None
    secret_key: SecretStr | None = None
    secure: bool = False
    region: str = "us-east-1"
    bucket: str = "nextstate-checkpoints"


class StackSettings(_Section):
    """The local stack that `nextstate stack up` installs and runs as plain processes."""

    host: str = "127.0.0.1"
    kafka_port: int = 9092
    controller_port: int = 9093
    registry_port: int = 8081
    registry_management_port: int = 9010
    minio_port: int = 9000
    minio_console_port: int = 9001
    kafka_version: str = "4.2.0"
    apicurio_version: str = "3.3.3"
    minio_release: str = "RELEASE.2025-09-07T16-13-09Z"
    cache_dir: Path = Field(default_factory=_cache_root)
    state_dir: Path = Field(default_factory=_state_root)
    java_home: Path | None = None
    kafka_heap: str = "-Xms256m -Xmx1g"
    registry_heap: str = "-Xms128m -Xmx512m"
    start_timeout_s: float = 180.0


class ServingSettings(_Section):
    engine: Annotated[EngineName, BeforeValidator(_lower)] = "local"
    model: str | None = None
    device: str = "cpu"
    dtype: Annotated[Dtype, BeforeValidator(_lower)] = "float32"
    max_batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    sglang_python: Path | None = None
    sglang_url: str | None = None
    port: int = 30001
    # Local engine: keep a copy of the base weights after a FULL checkpoint is loaded, so
    # score(base=True) keeps working (costs one more model in memory; LoRA needs no copy).
    keep_base: bool = True
    # Local engine on CPU: torch intra-op threads. 1 by default because OpenMP threads
    # spin-wait and collapse when the cores are shared (measured on 2 busy cores, SmolLM2 at
    # 8 concurrent requests: 2.5 tok/s with 2 threads, 41.6 with 1); raise it on a dedicated box.
    cpu_threads: int = Field(default=1, ge=1)
    # Local engine: prompts are prefilled in chunks of this many tokens, one chunk between two
    # decode steps, so a long prompt never stalls the running batch for its whole prefill.
    prefill_chunk: int = Field(default=256, ge=1)
    # Local engine: KV caches of earlier prompts kept for prompts that start the same way
    # (serving.prefix), up to this many MiB (0: off); matches shorter than min_tokens are not
    # reused. SmolLM2-135M in float32 holds ~46 KB per token: 1 GiB is ~23,000 tokens.
    prefix_cache_mb: int = Field(default=1024, ge=0)
    prefix_cache_min_tokens: int = Field(default=64, ge=1)
    # Where converted models (models/) and downloaded checkpoints (checkpoints/) are cached.
    cache_dir: Path = Field(default_factory=_cache_root)
    # SGLang: extra launch_server arguments, how long to wait for it to come up, and the
    # port it listens on when we launch it ourselves.
    sglang_args: list[str] = Field(default_factory=list)
    sglang_port: int = 30010
    sglang_start_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    # Reloader: which learner run's checkpoints to follow (None: any) and its consumer group.
    checkpoint_run: str | None = None
    reload_group: str | None = None
    # `nextstate serve` exposes the engine over HTTP on host:port; engine=remote reaches one at
    # engine_url. The bearer key is required whenever host is not a loopback address.
    host: str = "127.0.0.1"
    engine_url: str | None = None
    api_key: SecretStr | None = None


class GatewaySettings(_Section):
    host: str = "127.0.0.1"
    port: int = 30000
    # tenant -> key, either "sha256:<64 hex>" (what to store; `nextstate gateway hash-key`
    # prints it) or the raw key (hashed at start, never kept or logged in clear).
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # profile=local with no api_keys: a random key is generated once into this file (0600).
    dev_key_file: Path = Field(default_factory=lambda: _state_root() / "gateway" / "dev-key")
    max_body_bytes: int = 4 * 1024 * 1024
    session_idle_timeout_s: float = 600.0
    spool_dir: Path = Field(default_factory=lambda: _state_root() / "spool")
    spool_segment_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    # How long one drain attempt waits for Kafka before spooled events are retried.
    delivery_timeout_s: float = Field(default=15.0, gt=0)
    tenant: str = "default"
    # The model name /v1/models reports and turns record; default: the engine's.
    served_model_name: str | None = None
    # Other names a request's `model` may use for the served policy; any other name gets 404
    # model_not_found. By default the names nextstate's own clients send: `nextstate openclaw`
    # writes `policy` as OpenClaw's model id, the environment runner sends `nextstate`.
    model_aliases: list[str] = Field(default_factory=lambda: ["policy", "nextstate"])
    # Tool-call syntax of the model's chat template (producers.gateway.chat.TOOL_PARSERS);
    # None: detected from the template.
    tool_parser: str | None = None
    # What a request that leaves temperature / top_p / top_k out samples with: "model" takes
    # the model's own recommendation from its generation_config.json (as vLLM does) where it
    # gives one, OpenAI's defaults (1, 1, all tokens) elsewhere; "openai" always OpenAI's.
    sampling_defaults: Annotated[Literal["model", "openai"], BeforeValidator(_lower)] = "model"
    default_max_tokens: int = Field(default=256, ge=1)
    # The most new tokens one request gets: one asking for more (but no more than the model's
    # context) is clamped to this and told so (`X-Max-Tokens-Clamped`); one asking for more
    # than the context is refused with a 400. None: a quarter of the served context.
    max_tokens_cap: int | None = Field(default=None, ge=1)
    # Seconds an idle keep-alive connection stays open. Kept above what client pools keep an
    # idle connection (httpx 5 s, Node 4-5 s), so the client gives it up first and never sends
    # a request into a socket the server is closing. uvicorn's own default, 5 s, equals httpx's:
    # the race that reset the demo's users.
    keep_alive_timeout_s: float = Field(default=75.0, gt=0)
    # Answered request ids remembered per gateway, so a client's retry with the same
    # X-Request-Id (or Idempotency-Key) gets the first answer and records nothing; 0: off.
    replay_window: int = Field(default=10_000, ge=0)
    # Shutdown (SIGTERM/SIGINT): new requests are refused at once (503 shutting_down); those in
    # flight get this long to finish, then the rest end with that 503 (a stream with an error
    # event, its sampled tokens recorded); the spool is then flushed to Kafka.
    shutdown_grace_s: float = Field(default=10.0, ge=0)


class GroupSettings(_Section):
    """The group stage (processors.group): how a task's rollouts become step advantages."""

    # "step": r = outcome + process_weight·p normalised per (group, step index), OpenClaw-RL's
    # track 2; "outcome": the outcome normalised per group and broadcast to every step (GRPO).
    estimator: Annotated[Literal["step", "outcome"], BeforeValidator(_lower)] = "step"
    process_weight: float = 1.0
    # A group waits for all n rollouts; after deadline_s (processing time since its first record)
    # it is emitted with the rollouts that are complete if there are at least min_size, else dropped.
    deadline_s: float = Field(default=900.0, gt=0)
    min_size: int = Field(default=2, ge=1)
    # How long a finished group is remembered, so late records of it are recognised and ignored.
    done_retention_s: float = Field(default=86_400.0, gt=0)


class EnvSettings(_Section):
    """General agents' rollouts (producers.envs.runner): `nextstate envs run | worker`."""

    group_size: int = Field(default=4, ge=1, le=1024)        # n rollouts per task
    concurrency: int = Field(default=8, ge=1)               # rollouts in flight per process
    max_steps: int = Field(default=4, ge=1, le=1000)         # assistant turns per rollout
    episode_wall_s: float = Field(default=300.0, gt=0)       # one rollout, start to end
    verifier_timeout_s: float = Field(default=60.0, gt=0)
    request_timeout_s: float = Field(default=120.0, gt=0)    # one chat request to the gateway
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    # The gateway the rollouts go through (None: this machine's, gateway.host/port) and its key
    # (None: the local development key).
    gateway_url: str | None = None
    api_key: SecretStr | None = None
    # Text the assistant's every reply starts with (sent as a final assistant message the model
    # continues, `continue_final_message`): a prompt format that gives a small model a chance to
    # use a tool, e.g. "```python\nprint(". Prompt, never trained on. None: plain replies.
    prefill: str | None = None
    shaped_outcome: bool = True      # tool-call: a wrong answer that used tools is penalised less
    allow_weak_sandbox: bool = False
    # The worker's consumer session: how long a killed worker holds its tasks' partitions.
    session_timeout_s: float = Field(default=30.0, ge=6, le=300)
    # Python modules (dotted, on the path) that register more environments (producers.envs.base).
    modules: list[str] = Field(default_factory=list)


class ProcessorSettings(_Section):
    judge: Annotated[JudgeName, BeforeValidator(_lower)] = "feedback"
    judge_votes: int = Field(default=3, ge=1)
    judge_url: str | None = None
    judge_api_key: SecretStr | None = None
    judge_model: str | None = None
    judge_timeout_s: float = 60.0
    judge_concurrency: int = Field(default=8, ge=1)
    hint_votes: int = Field(default=1, ge=1)
    method: MethodName = Method.COMBINED   # what assemble emits (schemas.methods)
    # Hindsight revisions: a rejected answer's approved redo, trained in the rejected answer's
    # context (processors.assemble). The learner trains on them unless `learner.revisions` is off.
    revisions: bool = True
    # how long the first decided side of a possible revision waits for the other (about the
    # time a user takes to answer the redo, which closes its transition)
    revision_wait_s: float = Field(default=1800.0, gt=0)
    transition_timeout_s: float = 600.0
    faust_data_dir: Path = Field(default_factory=lambda: _state_root() / "faust")
    # LLM judge client: attempts per call (with exponential backoff) and sampling.
    judge_retries: int = Field(default=3, ge=0)
    judge_temperature: float = 0.6
    judge_max_tokens: int = Field(default=1024, ge=1)
    # Hint judge: "llm" or "feedback" (rule-based: the user's correction becomes the hint).
    hint_judge: Annotated[JudgeName, BeforeValidator(_lower)] = "feedback"
    # Hint selection: LONGEST, OVERLAP_SEQUENCE or OVERLAP_TOKEN (the last two need an engine).
    hint_selection: Annotated[HintSelection, BeforeValidator(_upper)] = HintSelection.LONGEST
    hint_min_chars: int = Field(default=11, ge=1)
    overlap_top_k: int = Field(default=8, ge=1)
    # Teacher: "base" (frozen base weights + hint) or "current" (the serving policy + hint),
    # and the model the hint stage loads an engine on: "served" (the default) is the served
    # base model (`serving.model`, the embedded default when unset), a path or name another
    # model, "none" no teacher (hints without logprobs: OPD and the teacher half of combined
    # then learn nothing).
    teacher_policy: Annotated[TeacherPolicy, BeforeValidator(_lower)] = TeacherPolicy.BASE
    teacher_model: str | None = "served"
    # Where the teacher reads the hint in the last user message: "before" its text (labelled
    # hint, then the labelled message) or "after" it (appended, OpenClaw-RL's form). Measured on
    # SmolLM2-135M, "before" let the hinted base meet more preferences (README, "What learns by
    # default"); it bounds what OPD can distil.
    hint_placement: Annotated[HintPlacement, BeforeValidator(_lower)] = "before"
    # The teacher's K most likely tokens at every response position, recorded beside the
    # logprobs of the sampled ones so the learner can match the teacher's distribution
    # (learner.loss.opd_form). 0 records only the sampled tokens. A long response gets a
    # smaller K, so one event's rows stay within teacher_top_max_entries (4 bytes id + 4 logprob).
    teacher_top_k: int = Field(default=16, ge=0)
    teacher_top_max_entries: int = Field(default=65_536, ge=1)
    # The teacher's own greedy answer under the accepted hint, made into a sample in the
    # student's context (processors.assemble; the learner weighs it by learner.teacher_answers).
    # It costs the hint stage one generation per accepted hint.
    teacher_answers: bool = False
    # Feedback judge rule table overrides (regexes over the user's text in the next state).
    correction_patterns: list[str] | None = None
    approval_patterns: list[str] | None = None
    # faust: seconds between idle-transition scans, records of a batch a stateless stage
    # handles side by side, and the consumer session timeout (how fast a killed worker's
    # partitions move).
    # The scan also releases verdicts held until the turns stream caught up: at 5 s, pushing
    # 8,000 turns gave 291 turns/s, at 1 s 369 (`nextstate bench pipeline`).
    timeout_scan_s: float = Field(default=1.0, gt=0)
    stage_concurrency: int = Field(default=4, ge=1)
    # A stage handles records in batches of up to batch_max, or what came within batch_within_s
    # (a lone record waits that long per stage), and waits for its outputs' delivery once per
    # batch (processors.runtime).
    batch_max: int = Field(default=256, ge=1)
    batch_within_s: float = Field(default=0.02, gt=0)
    session_timeout_s: float = Field(default=10.0, gt=0)
    group: GroupSettings = GroupSettings()


class LossSettings(_Section):
    """The loss's knobs, taken as they are by learner.losses (its docstring says what each does)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    opd_clip: float = 2.0
    # The teacher term: "token" (the clipped logprob gap of the sampled token as its advantage)
    # or "topk_forward" / "topk_reverse" (a KL to the teacher's top-K distribution where the
    # sample carries one: processors.teacher_top_k; samples without it keep the token term).
    # topk_forward by `nextstate bench personal`: it learned as fast as the token term and
    # kept the answers' variety.
    opd_form: Literal["token", "topk_forward", "topk_reverse"] = "topk_forward"
    # The temperature of the teacher's top-K distribution in the KL (learner.losses.tempered_bins;
    # below 1 sharper). The hint-conditioned base is less sure than the base, most at an answer's
    # first token (SmolLM2-135M on the 16 + 1 bins the KL sees: 1.96 against 1.72 nats there,
    # 1.36 against 1.30 later; `nextstate bench hints`), and a forward KL to it spreads the
    # policy out. The top-K forms only. 1: at 0.5 `brief` looped less and ended higher, `formal`
    # learned later, `plain` did worse, at 0.5 on the first 4 tokens neither moved; the served
    # runs alone moved as much between repeats (`nextstate bench personal`, five runs, README).
    opd_temperature: float = Field(default=1.0, gt=0, le=1)
    # 0: the temperature applies at every position; n: only at the first n tokens of each
    # response (the rest at 1), where the teacher is flattest and where an update moves every
    # answer's start (the "start" of `kl_on`).
    opd_temperature_tokens: int = Field(default=0, ge=0)
    # How much further than the hinted teacher the teacher term aims (learner.losses.guided_bins):
    # each of its top-K bins moved g × its log-ratio to the base model's bin in the student's own
    # context (the hint's effect), that ratio capped at ±opd_guidance_cap. It costs one more
    # forward (the base: LoRA's adapter off, else a frozen copy) a micro-batch per step.
    # The top-K forms only. None: 1 where the policy is the anchor (below), else 0, the teacher
    # as it is (one run on `formal` at 1 from the teacher: inside the served runs' spread,
    # `nextstate bench personal`, README).
    opd_guidance: float | None = Field(default=None, ge=0)
    opd_guidance_cap: float = Field(default=1.0, gt=0)
    # Where the guided term starts from: "teacher", the hinted teacher's bins (above), or
    # "policy", the policy's own bins at the step's first pass: the target is then the policy
    # moved g × the hint's effect, p_policy·(p_teacher/p_base)^g, so the term carries what the
    # hint changes and no pull back towards the base model the teacher is. With LoRA, before
    # any update the policy is the base, and at g = 1 the target is the teacher itself.
    # None: by method and by what trains: "policy" where the reward term trains beside it
    # (combined) and the base is the LoRA adapter switched off, "teacher" for opd alone and for
    # full weights (there the base would be a second copy of the model). On `formal` and `brief`
    # (seed 3) `combined` with LoRA learned faster and further from the policy; `opd` alone from
    # the policy drifted to answers that meet a preference and are no answer ("I am not sure how
    # to answer this"; the base model's logprob of its answers fell 1.57 per token): nothing but
    # the hint moves it (`nextstate bench personal`, README).
    opd_anchor: Literal["teacher", "policy"] | None = None
    # What the teacher term's sum is divided by: "step", the step's trained tokens, as every
    # other term; "teacher", the trained tokens of the samples that carry the teacher's
    # distribution. A personal agent's hints come with some of its turns: in `combined`, where
    # every turn trains, they held 16-50 % of a step's trained tokens (`brief`, seed 3), so "step"
    # gave the teacher term 1/2 to 1/6 of the weight `opd` gives it on the same samples (the
    # learner's `teacher_tokens` metric beside `trained_tokens`). The top-K forms only. "step":
    # with "teacher" `brief` reached 0.8 within 24 (seed 3), `formal` fell behind (README).
    opd_norm: Literal["step", "teacher"] = "step"
    w_rl: float = 1.0
    w_opd: float = 1.0
    # How the two terms share a step. "fixed": w_rl and w_opd as set. "approval": by the share s
    # of approvals among the users' verdicts in the running baseline's window (the last
    # `adv_window` rewards, learner.losses.RewardWindow; needs adv_norm "running"), the verdicts'
    # reward terms × min(1, 2s) and the teacher term × min(1, 2(1 − s)): the teacher leads while
    # users reject most answers, their verdicts once they approve most; at s = 1/2, or before any
    # verdict, both as set. Revisions, the teacher's answers and group advantages keep their
    # weight; `rl` and `opd` alone are unchanged. Runs with the teacher leading (w_rl 0.25) were
    # ahead at 24 interactions and behind after 48, where `rl` was ahead (README, "Who leads").
    balance: Literal["fixed", "approval"] = "fixed"
    # The weight of a token's advantage where it is below zero (1: symmetric). Pushed down, a
    # sampled token's probability goes wherever the model already puts it; below 1 the update
    # leans on what was approved and on the teacher term (`nextstate bench personal`).
    neg_weight: float = Field(default=1.0, ge=0, le=1)
    # None: by what trains. LoRA LORA_KL (its reference is the base with the adapter switched
    # off: one extra forward, no second copy); full weights 0 (a reference would be a second
    # copy of the model). `nextstate bench personal` reports how far answers drift either way.
    kl_coef: float | None = Field(default=None, ge=0)
    # How the KL is taken: "k3" from the sampled token's logprobs (GRPO's estimate), "full" the
    # exact KL of the two next-token distributions at every trained position (the reference's
    # whole vocabulary row: one more [tokens, vocab] tensor a micro-batch).
    kl_form: Literal["k3", "full"] = "k3"
    # Where the KL applies: "all" trained tokens, or "negative" only the tokens whose advantage
    # is below zero, where the update pushes the sampled token down and its probability goes
    # wherever the model puts it (where a collapsing numbered list comes from); a token pushed
    # up stays free to move.
    # "start": only the first `kl_start_tokens` tokens of each response. Their context is
    # nearly the same in every sample (the chat template's assistant header), so what moves
    # them moves every answer's start: on SmolLM2-135M the first token's KL to the base grew
    # to 1–2 nats in a few updates (0.1–0.7 at later positions), and a flat first-token
    # distribution is where greedy answers began a collapsing "1. 1. 1." list.
    kl_on: Literal["all", "negative", "start"] = "all"
    kl_start_tokens: int = Field(default=4, ge=1)
    entropy_coef: float = 0.0
    # The weight of a term that keeps the policy no less sure of its next token than the base
    # model in the same context, `flat_margin` nats allowed (learner.losses.flatness). The trained
    # policies of `nextstate bench personal` were flatter than the base all along their answers
    # (0.45 to 1.12 nats on SmolLM2-135M, 0.8 to 2.1 at the first token), and the flattest
    # drifted furthest. It costs one more forward (the base: LoRA's adapter off, else a frozen
    # copy) a micro-batch per step, and the policy's entropy. 0: at 1 with no margin (`brief`
    # seed 3, one run) the answers kept the base's logprob (−0.00 against −0.18) and the
    # preference came later (.25 / .44 after 12 / 24 against .69 / .69 on the same log): an
    # answer's start moves from one token to another through flatter distributions (README).
    # With a margin of 1 it was behind after 12 as well (.38 against .69, to 48: .94 against
    # .88), and neither run drifted, so nothing says it stops the drift.
    flat_coef: float = Field(default=0.0, ge=0)
    flat_margin: float = Field(default=0.0, ge=0)
    tis_cap: float = 2.0
    eps: float = 1e-6

    @model_validator(mode="after")
    def _anchor_needs_guidance(self) -> "LossSettings":
        if self.opd_anchor == "policy" and self.opd_guidance == 0:
            raise ValueError("loss.opd_anchor=policy moves the policy along the hint's effect and needs "
                             "loss.opd_guidance > 0 (1, its default there: the policy times the teacher's "
                             "ratio to the base)")
        return self

    def resolved(self, has_reward_term: bool, lora: bool, kl_coef: float) -> "LossSettings":
        """These knobs with the defaults that depend on the method and on what trains filled in:
        `kl_coef` where it is None, the anchor by whether the reward term trains beside the
        teacher's and the base comes free (`lora`), and the guidance by the anchor."""
        anchor = self.opd_anchor or ("policy" if has_reward_term and lora else "teacher")
        guidance = self.opd_guidance if self.opd_guidance is not None else (1.0 if anchor == "policy" else 0.0)
        return self.model_copy(update={"kl_coef": kl_coef if self.kl_coef is None else self.kl_coef,
                                       "opd_anchor": anchor, "opd_guidance": guidance})


class LoopGuardSettings(_Section):
    """The learner's check of its own greedy answers (learner.loop_guard). Users who sample
    never meet an answer that loops, so their rewards cannot reach the greedy mode of the
    policy, where SmolLM2-135M's answers began to loop a sentence after a few updates. Before
    each step the policy answers greedily up to `prompts` of the step's contexts and up to
    `recall` of the `memory` contexts it trained on before (those checked least often first);
    an answer in which one `ngram`-token sequence occurs `repeats` times or more loops, and so
    does one that says a sentence three times (infra.repetition, as the simulated users and
    the benchmark judge it). Its repeats (tokens that complete an earlier `unlikely_ngram`-gram
    of it, or belong to a later saying of the thrice-said sentence) are pushed down with the
    unlikelihood -log(1 - p), weighted `coef` against the step's trained tokens
    (sequence-level unlikelihood). 0 prompts: off (recall too). On by default: on SmolLM2-135M
    the step's 4 contexts alone left 4 looping greedy probe answers over `brief` and `plain`'s
    eight rounds against 10 without it on the same logs, for 27-38 % of the step time on two
    cores; with sentences read and 4 recalled, no looping greedy answer after 36 and 48
    interactions in six runs on seed 3 (`formal`, `brief`), more after 12 and 24, for 33-37 %
    (`nextstate bench personal`, README)."""

    prompts: int = Field(default=4, ge=0)
    # the step's contexts are few and alike; earlier ones widen the check at the cost of a
    # larger greedy batch
    recall: int = Field(default=4, ge=0)
    memory: int = Field(default=128, ge=0)
    max_new_tokens: int = Field(default=96, ge=1)
    # a longer context is not checked (its greedy answer costs a prefill of all of it)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    ngram: int = Field(default=8, ge=2)
    repeats: int = Field(default=3, ge=2)
    unlikely_ngram: int = Field(default=4, ge=1)
    coef: float = Field(default=1.0, ge=0)
    # besides each greedy answer, the greedy answers that begin with up to `starts` other first
    # tokens at least `start_ratio` as likely as the greedy one: where an update may move the
    # greedy start next (learner.loop_guard.LoopGuard.answers). Off: at 2 on `brief` seed 3 it
    # left 4 looping greedy probe answers over four rounds against 6 on the same log, for 1.75×
    # the guard's time (one run, README "Where the next update may start")
    starts: int = Field(default=0, ge=0)
    start_ratio: float = Field(default=0.5, gt=0, le=1)
    # push down the first `first` tokens of every looping answer as well, the start it grew
    # from: most early loops of `brief` runs were "1. 1. 1. …" from a list start the updates
    # had made greedy. Off: at 1 on `brief` seed 3 the probes looped as often (6 and 1 after
    # 12 and 24 against 5 and 1 on the same log; one run, README "Where the loops start")
    first: int = Field(default=0, ge=0)
    # after the step's passes, answer the same contexts with the updated weights and, while some
    # loop, run one more pass of the step with their repeats pushed down and check again, up to
    # `after` passes, before the weights can be published (the check before a step finds the
    # loops an update made only after the probes and the users met them). Off (0): at 2, four
    # 24-interaction runs (`brief` seeds 3, 3, 4, `formal` seed 3) were .06 ahead greedy after
    # 24 each time but behind sampled in three, looped about half as often where they looped,
    # for 1.5-1.6x the learner's time (README "Checking the weights before they go out")
    after: int = Field(default=0, ge=0)


class ApprovedSettings(_Section):
    """The answers users approved, trained again in later steps (learner.approved). A step
    trains each sample once, a few passes under the clip, so an approved answer can raise its
    tokens only by the clip's factor before it is gone. The learner remembers the newest `keep`
    approved answers (a reward above zero, hindsight revisions included; not general agents'
    group-normalised samples) and each later step trains up to `replay` of them again, the least
    replayed first, in one more micro-batch of at most `token_budget` tokens, at a precomputed
    advantage of `advantage` under the clip (self-imitation). Methods with a reward term only.
    Off (0): at 4, beside the defaults on the same log, `formal` and `brief` seed 3 were level
    greedy after 24 interactions and .11 and .12 ahead sampled, for 1.12-1.18x the learner's
    time; at 8 on `brief` seed 4, .13 behind greedy (README "Approved answers again")."""

    replay: int = Field(default=0, ge=0)
    keep: int = Field(default=32, ge=1)
    advantage: float = Field(default=1.0, gt=0)


LORA_LR = 2e-4
FULL_LR = 1e-5
# KL to the base with LoRA: 0. k3 at 0.2 did not keep greedy answers from looping and slowed
# what was learned; the full KL at 0.25 stopped the loops but learned brief later and less
# (.69 against .88 after 48), at 1.0 hardly at all. On the first 4 tokens only (kl_on=start,
# full, 1.0) it learned brief as fast with fewer looping greedy answers, but held formal near
# the base (.38 after 48): a greedy answer that starts as the base's goes on as the base's
# (`nextstate bench personal`, README).
LORA_KL = 0.0
LORA_EPOCHS = 4


class LearnerSettings(_Section):
    """The learner. `method` is the loss rule applied to every sample (rl | opd | combined,
    schemas.methods); `lora=None` means LoRA on CPU and full-weight training on GPU."""

    run: str = "main"
    method: MethodName = Method.COMBINED
    # train on hindsight revisions (processors.assemble) where the method has a reward term
    revisions: bool = True
    # the advantage of the hinted teacher's own answers (processors.teacher_answers), trained
    # in the student's context where the method has a reward term; 0 leaves them out
    teacher_answers: float = Field(default=1.0, ge=0)
    # how that advantage is spread over an answer's tokens: "flat", each token the same (the
    # answer as an example); "gap", each token times clip(teacher − policy, ±loss.opd_clip), the
    # hinted teacher's logprob of the token over the policy's at the step's first pass, so a token
    # the policy already gives as much as the teacher does is not pushed
    teacher_answer_credit: AnswerCredit = "flat"
    # the teacher's answers as a start: their advantage halves with every this many of them
    # trained (the count goes into checkpoints); 0, the default, keeps it whole
    teacher_answers_halflife: float = Field(default=0.0, ge=0)
    lora: bool | None = None
    device: str = "auto"
    # torch threads on CPU; None: torch's default (one per core). Several processes sharing the
    # cores (the demo's three learners beside the engine) go faster with 1 each: OpenMP
    # threads spin-wait when their cores are taken (see ServingSettings.cpu_threads).
    cpu_threads: int | None = Field(default=None, ge=1)
    bf16: bool | None = None
    model: str | None = None
    lora_rank: int = 16
    lora_alpha: int = 32
    # None: by what trains. LoRA (the CPU default) LORA_LR, which moves SmolLM2-135M within a
    # few dozen interactions (`nextstate bench personal`; 1e-5 moved nothing); full weights FULL_LR.
    lr: float | None = Field(default=None, gt=0)
    zero_stage: int = Field(default=0, ge=0, le=3)
    # A micro-batch holds at most `token_budget` padded tokens, a step `grad_accum` micro-batches:
    # 2 × 1,024 keeps a 2,048-token step at about half the peak memory of one 2,048-token
    # micro-batch (a 135M model's activations and logits: ~3 GB instead of ~6 GB on CPU).
    token_budget: int = Field(default=1024, ge=1)
    grad_accum: int = Field(default=2, ge=1)
    # Optimizer updates per step's samples (PPO epochs): each pass after the first trains the
    # same micro-batches again, the clip holding the policy near the one that sampled them.
    # None: by what trains, LoRA LORA_EPOCHS (a personal agent's few samples go further), full 1.
    epochs: int | None = Field(default=None, ge=1)
    max_staleness: int = Field(default=4, ge=0)
    staleness_policy: Annotated[StalenessPolicy, BeforeValidator(_lower)] = "correct"
    loss: LossSettings = LossSettings()
    loop_guard: LoopGuardSettings = LoopGuardSettings()
    approved: ApprovedSettings = ApprovedSettings()
    checkpoint_every_steps: int = Field(default=4, ge=1)
    checkpoint_every_s: float = 300.0
    checkpoint_idle_s: float = Field(default=5.0, gt=0)   # publish unpublished steps once the feed is this quiet
    work_dir: Path = Field(default_factory=lambda: _state_root() / "learner")
    # How the reward term of a sample without a precomputed advantage is normalised:
    # "running" (against the last `adv_window` rewards of any step, learner.losses.RewardWindow;
    # personal-agent traffic has no task groups, and its steps are a few samples that often share
    # one verdict), "batch" (a mean/std over the step, which gives such a step no signal), "group",
    # "step" or "none" (learner.losses). General agents' samples carry their own.
    adv_norm: Annotated[AdvNorm, BeforeValidator(_lower)] = "running"
    adv_window: int = Field(default=64, ge=1)
    lr_schedule: Annotated[LrSchedule, BeforeValidator(_lower)] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    total_steps: int = Field(default=10_000, ge=1)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    fill_timeout_s: float = Field(default=2.0, gt=0)
    # samples read and decoded ahead of the trainer, in a thread (learner.sources.PrefetchingSource);
    # 0 reads them between steps
    prefetch: int = Field(default=256, ge=0)
    bucket: str | None = None
    metrics_port: int | None = None
    seed: int = 0

    def uses_lora(self, device_type: str) -> bool:
        return self.lora if self.lora is not None else device_type == "cpu"

    def loss_for(self, device_type: str) -> LossSettings:
        """The loss's knobs with the defaults that depend on the method and on what trains
        filled in (`LossSettings.resolved`)."""
        lora = self.uses_lora(device_type)
        return self.loss.resolved(rule(self.method).reward_term, lora, LORA_KL if lora else 0.0)

    def updates_per_step(self, device_type: str) -> int:
        """`epochs`, or the default for what trains on this device (LoRA: LORA_EPOCHS, full: 1)."""
        if self.epochs is not None:
            return self.epochs
        return LORA_EPOCHS if self.uses_lora(device_type) else 1

    def learning_rate(self, device_type: str) -> float:
        """`lr`, or the default for what trains on this device (LoRA: LORA_LR, full: FULL_LR)."""
        if self.lr is not None:
            return self.lr
        return LORA_LR if self.uses_lora(device_type) else FULL_LR


class Settings(BaseSettings):
    """Everything a nextstate process can be told. Frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix="NEXTSTATE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    profile: Profile = Profile.LOCAL
    kafka: KafkaSettings = KafkaSettings()
    registry: RegistrySettings = RegistrySettings()
    storage: StorageSettings = StorageSettings()
    stack: StackSettings = StackSettings()
    serving: ServingSettings = ServingSettings()
    gateway: GatewaySettings = GatewaySettings()
    processors: ProcessorSettings = ProcessorSettings()
    envs: EnvSettings = EnvSettings()
    learner: LearnerSettings = LearnerSettings()

    @model_validator(mode="after")
    def _local_addresses(self) -> "Settings":
        """Clients follow the local stack's ports unless their addresses were given."""
        st = self.stack
        derived = (
            ("kafka", "bootstrap_servers", f"{st.host}:{st.kafka_port}"),
            ("registry", "url", f"http://{st.host}:{st.registry_port}/apis/ccompat/v7"),
            ("storage", "endpoint", f"{st.host}:{st.minio_port}"),
        )
        for section, name, value in derived:
            current = getattr(self, section)
            if name not in current.model_fields_set:
                object.__setattr__(self, section, current.model_copy(update={name: value}))
        return self

    @model_validator(mode="after")
    def _secrets(self) -> "Settings":
        if self.profile is Profile.LOCAL:
            # The local stack's development credentials: they only ever guard 127.0.0.1.
            if self.storage.access_key is None or self.storage.secret_key is None:
                storage = self.storage.model_copy(
                    update={
                        "access_key": self.storage.access_key or "nextstate",
                        "secret_key": self.storage.secret_key or SecretStr("nextstate-local-dev"),
                    }
                )
                object.__setattr__(self, "storage", storage)
            return self
        missing = [
            name
            for name, value in (
                ("storage.access_key", self.storage.access_key),
                ("storage.secret_key", self.storage.secret_key),
            )
            if value is None
        ]
        if not self.gateway.api_keys:
            missing.append("gateway.api_keys")
        if missing:
            raise ConfigError(
                f"profile {self.profile.value!r} needs explicit secrets: {', '.join(missing)} "
                f"(set NEXTSTATE_{missing[0].upper().replace('.', '__')})"
            )
        return self


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, with keyword overrides taking precedence."""
    try:
        return Settings(**overrides)
    except ConfigError:
        raise
    except ValidationError as exc:   # every bad field named, with the value it got
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}{_shown(e)}"
                    for e in exc.errors(include_url=False)]
        raise ConfigError("invalid settings: " + "; ".join(problems)) from exc


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data with every secret shown as '**********'."""
    return settings.model_dump(mode="json")


_SECRET_WORDS = ("key", "secret", "password", "token")


def _shown(error: dict[str, Any]) -> str:
    """' (got <value>)' for an invalid setting, never for a secret or a whole section."""
    where = ".".join(str(p) for p in error["loc"]).lower()
    value = error.get("input")
    if any(w in where for w in _SECRET_WORDS) or isinstance(value, dict) or not error["loc"]:
        return ""
    return f" (got {value!r})"
