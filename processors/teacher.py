"""Teacher: logprobs of the *exact* response tokens under the hint-enhanced context.

The turn's recorded messages and tools are rendered by serving.chat, the renderer the gateway
used for the student's prompt, with the hint added to the last user message (serving.chat's
``with_hint``; in front of its text unless ``processors.hint_placement`` says after), so the
teacher's context differs from the student's by the hint alone; the engine scores the turn's
recorded ``response_token_ids`` as the continuation: the response is never re-tokenized.
Which policy teaches is configurable and recorded: ``base`` (the frozen base weights,
``score(base=True)``) or ``current`` (the policy the engine serves now).

With ``processors.teacher_answers`` the teacher also writes its own greedy answer under the
hint (``answer``): what the hint-conditioned model would have said, trained by the learner as
an example in the student's context (processors.assemble). Generation has no ``base`` switch:
an in-process engine under ``base`` loads no checkpoint, so its answer is the base model's; a
remote engine (``serving.engine=remote``, `nextstate serve`) answers with the policy it serves,
whatever ``teacher_policy`` says.

The teacher runs inside the hint stage's process (HintJudged carries its logprobs), so
hints and teacher scores travel together on ``hints``. Needs an Engine (serving.engine)
and the served model's tokenizer; knows nothing about Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.errors import ProcessorError
from infra.repetition import loops
from schemas.events import TeacherPolicy, TurnRecorded
from serving.chat import render_turn
from serving.engine import Engine, Generation, Scores


@dataclass
class Teacher:
    engine: Engine
    tokenizer: Any
    policy: TeacherPolicy = TeacherPolicy.BASE
    placement: str = "before"

    def prompt_ids(self, turn: TurnRecorded, hint: str) -> list[int]:
        """The student's prompt rendered by the same renderer, with the hint added."""
        return render_turn(self.tokenizer, turn.messages_json, turn.tools_json, hint,
                           turn.continue_final_message, self.placement)

    async def score(self, turn: TurnRecorded, hint: str, top_k: int = 0) -> Scores:
        """The teacher's logprob of each recorded response token (and its top-k if asked)."""
        scores = await self.engine.score(self.prompt_ids(turn, hint), list(turn.response_token_ids),
                                         top_k=top_k, base=self.policy is TeacherPolicy.BASE)
        n = len(turn.response_token_ids)
        if len(scores.logprobs) != n:
            raise ProcessorError(f"teacher returned {len(scores.logprobs)} logprobs for the "
                                 f"{n} response tokens of turn {turn.event_id}")
        return scores

    async def answer(self, turn: TurnRecorded, hint: str) -> Generation | None:
        """The teacher's own greedy answer to the turn under the hint, within the turn's token
        limit, stop strings and grammar (a structured answer stays one); None when it loops (infra.repetition), as an answer a user
        would reject: a looping answer is no example to learn from."""
        params = turn.sampling.model_copy(update={"temperature": 0.0, "top_p": 1.0, "seed": None})
        made = await self.engine.generate(self.prompt_ids(turn, hint), params)
        if not made.token_ids or loops(self.tokenizer.decode(made.token_ids, skip_special_tokens=True)):
            return None
        return made

    async def student(self, turn: TurnRecorded, top_k: int) -> Scores:
        """The serving policy's top-k over the response under the original prompt."""
        return await self.engine.score(list(turn.prompt_token_ids), list(turn.response_token_ids),
                                       top_k=top_k, base=False)


NO_TEACHER = ("", "none", "off", "false")


def teacher_spec(settings: Any) -> str | None:
    """What ``processors.teacher_model`` asks for: "served", a model path or name, or None."""
    name = (settings.processors.teacher_model or "").strip()
    if name.lower() in NO_TEACHER:
        return None
    return "served" if name.lower() == "served" else name


def describe_teacher(settings: Any) -> str:
    spec = teacher_spec(settings)
    if spec == "served":
        return f"the served base model ({settings.serving.model or 'the embedded default'})"
    return spec or "none"


def build_teacher(settings: Any) -> Teacher | None:
    """The teacher the hint stage uses: an engine on ``processors.teacher_model`` ("served": the
    served base model, the default), or None ("none")."""
    p = settings.processors
    name = teacher_spec(settings)
    if name is None:
        return None
    served = name == "served"
    serving = settings.serving if served else settings.serving.model_copy(update={"model": name})
    from serving import create_engine

    engine = create_engine(serving)
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        from serving.models import resolve_model

        if served:   # the served model; unset, the embedded default as the gateway resolves it
            name = serving.model or str(resolve_model(None, serving.cache_dir))
        tokenizer = AutoTokenizer.from_pretrained(engine.info().details.get("tokenizer", name))
    return Teacher(engine, tokenizer, TeacherPolicy(p.teacher_policy), p.hint_placement)
