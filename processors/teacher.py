"""Teacher: logprobs of the *exact* response tokens under the hint-enhanced context.

The hint is appended to the last user message as ``"\\n\\n[user's hint / instruction]\\n{hint}"``
(a user message is added if the conversation has none), the prompt is re-rendered with the
model's chat template (the turn's tools included) into new prompt ids, and the engine scores
the turn's recorded ``response_token_ids`` as the continuation: the response is never
re-tokenized. Which policy teaches is configurable and recorded: ``base`` (the frozen base
weights, ``score(base=True)``) or ``current`` (the policy the engine serves now).

The teacher runs inside the hint stage's process (HintJudged carries its logprobs), so
hints and teacher scores travel together on ``hints``. Needs an Engine (serving.engine)
and the served model's tokenizer; knows nothing about Kafka.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from infra.errors import ProcessorError
from schemas.events import TurnRecorded
from serving.engine import Engine, Scores

HINT_SUFFIX = "\n\n[user's hint / instruction]\n{hint}"


class TeacherPolicy(StrEnum):
    BASE = "base"
    CURRENT = "current"


def enhanced_messages(messages: list[dict[str, Any]], hint: str) -> list[dict[str, Any]]:
    """A copy of `messages` with the hint appended to the last user message."""
    out = copy.deepcopy(messages)
    suffix = HINT_SUFFIX.format(hint=hint)
    for m in reversed(out):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = [*content, {"type": "text", "text": suffix}]
        else:
            m["content"] = (content or "") + suffix
        return out
    out.append({"role": "user", "content": suffix.lstrip()})
    return out


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list | None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Teacher:
    engine: Engine
    tokenizer: Any
    policy: TeacherPolicy = TeacherPolicy.BASE

    def prompt_ids(self, turn: TurnRecorded, hint: str) -> list[int]:
        messages = json.loads(turn.messages_json)
        tools = json.loads(turn.tools_json) if turn.tools_json else None
        return render_prompt_ids(self.tokenizer, enhanced_messages(messages, hint), tools)

    async def score(self, turn: TurnRecorded, hint: str, top_k: int = 0) -> Scores:
        """The teacher's logprob of each recorded response token (and its top-k if asked)."""
        scores = await self.engine.score(self.prompt_ids(turn, hint), list(turn.response_token_ids),
                                         top_k=top_k, base=self.policy is TeacherPolicy.BASE)
        n = len(turn.response_token_ids)
        if len(scores.logprobs) != n:
            raise ProcessorError(f"teacher returned {len(scores.logprobs)} logprobs for the "
                                 f"{n} response tokens of turn {turn.event_id}")
        return scores

    async def student(self, turn: TurnRecorded, top_k: int) -> Scores:
        """The serving policy's top-k over the response under the original prompt."""
        return await self.engine.score(list(turn.prompt_token_ids), list(turn.response_token_ids),
                                       top_k=top_k, base=False)


def build_teacher(settings: Any) -> Teacher | None:
    """The teacher the hint stage uses: an engine on ``processors.teacher_model``, or None."""
    p = settings.processors
    if not p.teacher_model:
        return None
    serving = settings.serving.model_copy(update={"model": p.teacher_model})
    try:
        from serving import create_engine

        engine = create_engine(serving)
    except ModuleNotFoundError:
        # An engine module the registry lists is not installed here: build the configured
        # engine from its own module (each engine module registers itself).
        import importlib

        from serving.engine import ENGINES

        importlib.import_module(f"serving.{serving.engine}")
        engine = ENGINES[serving.engine](serving)
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(engine.info().details.get("tokenizer", p.teacher_model))
    return Teacher(engine, tokenizer, TeacherPolicy(p.teacher_policy))
