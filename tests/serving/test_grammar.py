"""Constrained decoding in the local engine, on the tiny random model (which on its own never
writes JSON): what comes out matches the grammar and ends there, the logprobs stay the raw
ones, and a constrained row changes nothing for the free rows it is batched with."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from infra.errors import ServingError
from infra.settings import ServingSettings
from producers.gateway.chat import TOOL_PARSERS
from producers.gateway.constraints import request_grammar, tool_call_grammar
from producers.gateway.wire import ResponseFormat
from schemas.events import SamplingParams

pytestmark = pytest.mark.asyncio

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2, 3]}},
          "required": ["ok", "n"]}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(max_batch_size=8), model_dir=tiny_model_dir)
    yield eng
    asyncio.run(eng.close())


def schema_grammar(schema: dict, strict: bool = True) -> str:
    fmt = ResponseFormat.model_validate({"type": "json_schema",
                                         "json_schema": {"name": "t", "strict": strict, "schema": schema}})
    return request_grammar(fmt, None, None, TOOL_PARSERS["hermes"])


def answer(engine, gen) -> str:
    ids = [t for t in gen.token_ids if t not in engine.eos_ids]
    return engine.tokenizer.decode(ids)


async def test_sampled_answers_match_the_schema_and_end_there(engine) -> None:
    prompt = engine.tokenizer.encode("give me json")
    grammar = schema_grammar(SCHEMA)
    gens = await asyncio.gather(*(engine.generate(prompt, SamplingParams(temperature=1.0, max_new_tokens=64,
                                                                          seed=s, grammar=grammar))
                                  for s in range(4)))
    for gen in gens:
        value = json.loads(answer(engine, gen))
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
        assert gen.finish_reason == "stop" and gen.token_ids[-1] in engine.eos_ids
        # the recorded logprobs are the raw model's, not the masked distribution's
        scores = await engine.score(prompt, gen.token_ids)
        assert gen.logprobs == pytest.approx(scores.logprobs, abs=1e-4)
    free = await engine.generate(prompt, SamplingParams(temperature=1.0, max_new_tokens=64, seed=0))
    with pytest.raises(ValueError):   # the model alone writes no JSON: the grammar did it
        json.loads(answer(engine, free))


async def test_a_constrained_row_leaves_its_batch_mates_alone(engine) -> None:
    prompt = engine.tokenizer.encode("batch mates")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    alone = await engine.generate(prompt, greedy)
    together = await asyncio.gather(
        engine.generate(prompt, greedy),
        engine.generate(prompt, greedy.model_copy(update={"grammar": schema_grammar(SCHEMA)})),
        engine.generate(prompt, greedy))
    assert together[0].token_ids == alone.token_ids == together[2].token_ids
    assert answer(engine, together[1]).startswith('{"')


async def test_an_answer_cut_short_is_a_prefix_of_one_the_grammar_allows(engine) -> None:
    prompt = engine.tokenizer.encode("short")
    gen = await engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=5,
                                                       grammar=schema_grammar(SCHEMA)))
    assert gen.finish_reason == "length" and len(gen.token_ids) == 5
    assert answer(engine, gen) == '{"ok"'   # one byte a token; the schema's order, compact


async def test_a_forced_tool_call_is_written_in_the_templates_syntax(engine) -> None:
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"]}}}]
    grammar = str(tool_call_grammar(tools, TOOL_PARSERS["hermes"]))
    gen = await engine.generate(engine.tokenizer.encode("call it"),
                                SamplingParams(temperature=1.0, max_new_tokens=80, seed=3, grammar=grammar))
    parsed = TOOL_PARSERS["hermes"].parse(answer(engine, gen))
    assert [c.name for c in parsed.tool_calls] == ["pick"] and parsed.content is None
    assert json.loads(parsed.tool_calls[0].arguments)["colour"] in ("red", "blue")


async def test_a_grammar_that_does_not_compile_is_a_clear_error(engine) -> None:
    with pytest.raises(ServingError, match="does not compile"):
        await engine.generate(engine.tokenizer.encode("x"),
                              SamplingParams(max_new_tokens=4, grammar="root ::= (unclosed"))
    # and the engine serves on
    assert (await engine.generate(engine.tokenizer.encode("x"), SamplingParams(max_new_tokens=2))).token_ids
