"""The gateway over real HTTP (uvicorn on a free port) with the official `openai` client and
the real local engine on the tiny model. Recorded turns are read back from the spool (no
Kafka here; test_gateway_kafka.py covers delivery)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from infra.settings import ServingSettings
from producers.gateway.server import ServerThread
from schemas.events import SamplingParams, SessionSource, TurnRecorded, TurnType
from serving.chat import normalize_messages, render_prompt
from tests.producers.gateway_fixtures import engine, keyring, long_engine, long_model_dir, make_gateway, tokenizer  # noqa: F401
from tests.producers.helpers import KEYS, ScriptedEngine, SlowEngine
from tests.producers.openclaw_shapes import OpenClawConversation, openclaw_request, openclaw_tools, system_prompt

TOOL_SCRIPT = 'Reading it.<tool_call>{"name": "read", "arguments": {"path": "README.md"}}</tool_call>'


def client(server: ServerThread, key: str = KEYS["acme"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def turns(gw) -> list[TurnRecorded]:
    return [s.event for s in gw.spool.read(10_000) if isinstance(s.event, TurnRecorded)]


def test_chat_records_exactly_what_the_engine_sampled(make_gateway, engine, tokenizer):
    gw = make_gateway(engine)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    with ServerThread(gw) as server:
        raw = client(server).chat.completions.with_raw_response.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, seed=3)
        resp = raw.parse()
    assert raw.headers["x-policy-version"] == "0" and raw.headers["x-session-id"]
    [turn] = turns(gw)
    prompt = render_prompt(tokenizer, normalize_messages(messages), None)
    assert turn.prompt_token_ids == prompt
    assert len(turn.response_token_ids) == len(turn.response_logprobs) == resp.usage.completion_tokens
    assert resp.usage.prompt_tokens == len(prompt)
    assert tokenizer.decode(turn.response_token_ids, skip_special_tokens=True) == (resp.choices[0].message.content or "")
    assert turn.turn_type is TurnType.MAIN and turn.tenant == "acme" and turn.turn_index == 0
    assert turn.sampling.max_new_tokens == 12 and turn.sampling.seed == 3
    assert json.loads(turn.messages_json) == messages
    # Greedy: the engine called directly samples the same ids with the same logprobs.
    import asyncio
    direct = asyncio.run(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12, seed=3)))
    assert direct.token_ids == turn.response_token_ids
    assert direct.logprobs == pytest.approx(turn.response_logprobs, abs=1e-4)


def test_own_time_leaves_out_the_waits_on_the_engine(make_gateway, engine):
    # Every wait on the engine costs 0.2 s more: the gateway's own time must not count them,
    # whole or streamed, while the request's latency does.
    gw = make_gateway(SlowEngine(engine, 0.2))
    own: list[float] = []
    gw.metrics.own_listeners.append(own.append)
    messages = [{"role": "user", "content": "hello"}]
    with ServerThread(gw) as server:
        c = client(server)
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                                temperature=0, stream=True))
        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEYS['acme']}"}).text
    streamed = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content is not None)
    assert len(own) == 2 and streamed >= 1
    assert all(0 < t < 0.2 for t in own), own
    assert "nextstate_gateway_own_seconds_count 2.0" in metrics
    latency = [line for line in metrics.splitlines()
               if line.startswith('nextstate_gateway_request_seconds_sum{route="/v1/chat/completions"}')]
    assert float(latency[0].rsplit(" ", 1)[1]) >= 0.2 * (1 + 1) + sum(own)   # one wait whole, ≥ 1 streamed


def test_streaming_is_token_by_token_with_a_usage_chunk(make_gateway, engine, tokenizer):
    gw = make_gateway(engine)
    with ServerThread(gw) as server:
        chunks = list(client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "count"}]}],
            stream=True, stream_options={"include_usage": True}, max_completion_tokens=24,
            temperature=1.0, seed=7))
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    [turn] = turns(gw)
    assert len(text_chunks) > 1  # streamed as sampled, not one fake chunk
    streamed = "".join(c.choices[0].delta.content for c in text_chunks)
    assert streamed == tokenizer.decode(turn.response_token_ids, skip_special_tokens=True)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(turn.response_token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_tool_calls_come_back_whole_and_streamed(make_gateway, long_engine, tokenizer):
    # 12 tool definitions are ~2,500 byte tokens: the long-context tiny model scores the script.
    gw = make_gateway(ScriptedEngine(long_engine, tokenizer, TOOL_SCRIPT))
    messages = [{"role": "user", "content": "show me the readme"}]
    with ServerThread(gw) as server:
        c = client(server)
        resp = c.chat.completions.create(model="tiny", messages=messages, tools=openclaw_tools(),
                                         tool_choice="auto", max_tokens=200)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Reading it."
        call = choice.message.tool_calls[0]
        assert call.function.name == "read" and json.loads(call.function.arguments) == {"path": "README.md"}
        stream = list(c.chat.completions.create(model="tiny", messages=messages, tools=openclaw_tools(),
                                                stream=True, max_tokens=200))
        deltas = [ch.choices[0].delta for ch in stream if ch.choices]
        assert "".join(d.content or "" for d in deltas) == "Reading it."
        streamed_calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert [tc.function.name for tc in streamed_calls] == ["read"]
        assert [ch.choices[0].finish_reason for ch in stream if ch.choices][-1] == "tool_calls"
        # The client sends the call and its result back: the template renders both.
        follow = messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": "# nextstate"}]
        c.chat.completions.create(model="tiny", messages=follow, tools=openclaw_tools(), max_tokens=200)
    recorded = turns(gw)
    assert len(recorded) == 3 and all(t.finish_reason == "tool_calls" for t in recorded)
    assert json.loads(recorded[2].messages_json)[-1]["role"] == "tool"
    assert recorded[2].prompt_token_ids == render_prompt(tokenizer, normalize_messages(follow), openclaw_tools())


def test_auth_errors_limits_and_models(make_gateway, engine):
    gw = make_gateway(engine, max_body_bytes=64 * 1024)
    with ServerThread(gw) as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, key="wrong").chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}])
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert client(server, KEYS["globex"]).models.list().data[0].id == gw.model_name
        assert client(server).models.retrieve("policy").id == "policy"   # a served name, an alias too
        # more stop strings than OpenAI's 4, as clients written for vLLM send; not without bound
        many = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=2, stop=[f"s{i}" for i in range(8)])
        assert many.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError, match="at most 32 stop sequences"):
            client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                   stop=[f"s{i}" for i in range(33)])
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client(server).models.retrieve("gpt-4o")
        other = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"},
                           headers={"Authorization": f"Bearer {KEYS['acme']}"})
        assert other.status_code == 404 and "/v1/chat/completions" in other.json()["error"]["message"]
        auth = {"Authorization": f"Bearer {KEYS['acme']}"}
        url = f"{server.url}/v1/chat/completions"
        bad = httpx.post(url, content=b"{nope", headers=auth)
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        invalid = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "n": 3}, headers=auth)
        assert invalid.status_code == 400 and "n=3 is not supported" in invalid.json()["error"]["message"]
        assert invalid.json()["error"]["param"] == "n"
        # invalid fields answer 400 as OpenAI does: the SDK raises BadRequestError, naming the field
        with pytest.raises(openai.BadRequestError, match="temperature") as refused:
            client(server, KEYS["acme"]).chat.completions.create(
                model="policy", messages=[{"role": "user", "content": "x"}], temperature=3)
        assert refused.value.param == "temperature"
        image = httpx.post(url, json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                           headers=auth)
        assert image.status_code == 400 and "only" in image.json()["error"]["message"]
        big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
        assert httpx.post(url, json=big, headers=auth).status_code == 413  # by Content-Length
        chunked = httpx.post(url, content=iter([json.dumps(big).encode()[i:i + 8192]
                                                for i in range(0, 80_000, 8192)]), headers=auth)
        assert chunked.status_code == 413  # by the bytes actually received
        metrics = httpx.get(f"{server.url}/metrics", headers=auth).text
        assert 'nextstate_gateway_requests_total{route="/v1/chat/completions",status="413"} 2.0' in metrics
    assert [t.sampling.stop for t in turns(gw)] == [[f"s{i}" for i in range(8)]]  # refused ones record nothing


def test_a_model_the_gateway_does_not_serve_is_404_unless_mapped(make_gateway, engine):
    gw = make_gateway(engine, model_aliases=["policy", "my-agent"])
    with ServerThread(gw) as server:
        c = client(server)
        with pytest.raises(openai.NotFoundError) as err:
            c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert err.value.code == "model_not_found" and "gateway.model_aliases" in err.value.message
        for name in ("tiny", "policy", "my-agent"):   # the served name and the operator's names
            assert c.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=2).model == "tiny"
        auth = {"Authorization": f"Bearer {KEYS['acme']}"}
        omitted = httpx.post(f"{server.url}/v1/chat/completions", headers=auth,
                             json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert omitted.status_code == 200
    assert len(turns(gw)) == 4   # the refused request recorded nothing


def test_max_tokens_beyond_the_context_is_refused_and_beyond_the_cap_clamped(make_gateway, engine):
    gw = make_gateway(engine, max_tokens_cap=5)
    context = engine.info().max_context
    with ServerThread(gw) as server:
        auth = {"Authorization": f"Bearer {KEYS['acme']}"}
        url = f"{server.url}/v1/chat/completions"
        ask = {"messages": [{"role": "user", "content": "count"}], "temperature": 0}
        huge = httpx.post(url, json={**ask, "max_tokens": 10**12}, headers=auth)
        assert huge.status_code == 400
        err = huge.json()["error"]
        assert err["code"] == "context_length_exceeded" and str(context) in err["message"]
        assert turns(gw) == []   # refused: nothing recorded
        clamped = httpx.post(url, json={**ask, "max_tokens": context}, headers=auth)
        assert clamped.status_code == 200
        assert clamped.headers["x-max-tokens-clamped"] == f"{context} -> 5"
        assert clamped.json()["nextstate"]["max_tokens_clamped"] == {"asked": context, "to": 5}
        assert clamped.json()["usage"]["completion_tokens"] <= 5
        within = httpx.post(url, json={**ask, "max_tokens": 3}, headers=auth)
        assert within.status_code == 200 and "x-max-tokens-clamped" not in within.headers
        assert "max_tokens_clamped" not in within.json()["nextstate"]
    [first, second] = turns(gw)
    assert first.sampling.max_new_tokens == 5 and second.sampling.max_new_tokens == 3


def test_openclaw_shaped_requests_land_in_one_derived_session(make_gateway, long_engine, tokenizer):
    gw = make_gateway(long_engine)
    convo = OpenClawConversation(system_prompt(1_500), "Set up the project")
    with ServerThread(gw) as server:
        c = client(server)
        # A real 40,000-character system prompt is longer than this model's context: a clear
        # 400 (code context_length_exceeded), never a crash.
        huge = openclaw_request([{"role": "system", "content": [{"type": "text", "text": system_prompt()}]},
                                 {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(**huge)
        assert err.value.code == "context_length_exceeded" and "16384" in err.value.message
        for n in range(4):
            body = openclaw_request(convo.request(), max_completion_tokens=8)
            chunks = list(c.chat.completions.create(**body))
            assert chunks[-1].usage is not None and chunks[-1].choices == []
            reply = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            convo.answered(reply, f"now step {n + 1}")
    recorded = turns(gw)
    assert len({t.session_id for t in recorded}) == 1
    assert [t.turn_index for t in recorded] == [0, 1, 2, 3]
    assert all(t.session_source is SessionSource.DERIVED and t.turn_type is TurnType.MAIN for t in recorded)
    assert recorded[0].tools_json and len(json.loads(recorded[0].tools_json)) == 12


def test_a_client_leaving_mid_stream_still_gets_its_tokens_recorded(make_gateway, engine):
    gw = make_gateway(engine)
    body = {"messages": [{"role": "user", "content": "go on"}], "stream": True, "max_tokens": 1500,
            "temperature": 1.0, "seed": 1}
    with ServerThread(gw) as server:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEYS['acme']}", "X-Session-Id": "s-left"}) as r:
            assert r.headers["x-policy-version"] == "0" and r.headers["x-session-id"] == "s-left"
            for line in r.iter_lines():  # the role chunk, then the first text; then hang up
                if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                    break
        from tests.conftest import wait_for
        [turn] = wait_for(lambda: turns(gw), timeout=60, what="the aborted turn to be recorded")
    assert turn.finish_reason in ("abort", "stop")  # "stop" only if EOS came before the hang-up
    assert 0 < len(turn.response_token_ids) == len(turn.response_logprobs)
    assert turn.session_id == "s-left"


def test_a_stop_string_ends_the_answer_and_the_sampled_tokens_are_kept(make_gateway, engine, tokenizer):
    gw = make_gateway(ScriptedEngine(engine, tokenizer, "hello STOP world"))
    with ServerThread(gw) as server:
        c = client(server)
        whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stop=["STOP"])
        streamed = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                  stop="STOP", stream=True))
        bad = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['acme']}",
                                                                        "X-Turn-Type": "sometimes"},
                         json={"messages": [{"role": "user", "content": "x"}]})
    assert whole.choices[0].message.content == "hello " and whole.choices[0].finish_reason == "stop"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "hello "
    assert bad.status_code == 400 and "'sometimes'" in bad.json()["error"]["message"]
    for turn in turns(gw):  # every sampled id up to the one that completed "STOP", none after
        assert tokenizer.decode(turn.response_token_ids) == "hello STOP"
        assert turn.response_text == "hello STOP" and turn.finish_reason == "stop"


def test_logprobs_are_the_recorded_ones_and_top_logprobs_come_from_the_served_weights(make_gateway, engine,
                                                                                      tokenizer):
    gw = make_gateway(engine)
    messages = [{"role": "user", "content": "say something"}]
    with ServerThread(gw) as server:
        c = client(server)
        whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=3)
        plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0,
                                          seed=5, logprobs=True)
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=1.0,
                                                seed=6, logprobs=True, stream=True))
        bad = {body_key: httpx.post(f"{server.url}/v1/chat/completions",
                                    headers={"Authorization": f"Bearer {KEYS['acme']}"},
                                    json={"messages": messages, **body}).json()["error"]["message"]
               for body_key, body in {"no logprobs": {"top_logprobs": 2, "logprobs": None},
                                      "streamed": {"logprobs": True, "top_logprobs": 2, "stream": True},
                                      "too many": {"logprobs": True, "top_logprobs": 21}}.items()}
    greedy, sampled, streamed = turns(gw)
    rows = whole.choices[0].logprobs.content
    assert [r.logprob for r in rows] == pytest.approx(greedy.response_logprobs, abs=1e-6)
    assert b"".join(bytes(r.bytes) for r in rows).decode() == tokenizer.decode(greedy.response_token_ids)
    assert [r.token for r in rows] == [tokenizer.decode([t]) for t in greedy.response_token_ids]
    for r in rows:   # greedy: the sampled token is the top one, and the scoring pass agrees with sampling
        assert len(r.top_logprobs) == 3
        assert [a.logprob for a in r.top_logprobs] == sorted((a.logprob for a in r.top_logprobs), reverse=True)
        assert r.top_logprobs[0].token == r.token and r.top_logprobs[0].logprob == pytest.approx(r.logprob, abs=1e-3)
    assert whole.model_extra["nextstate"]["top_logprobs_policy_version"] == 0
    assert [r.logprob for r in plain.choices[0].logprobs.content] == pytest.approx(sampled.response_logprobs, abs=1e-6)
    assert all(r.top_logprobs == [] for r in plain.choices[0].logprobs.content)
    per_chunk = [r for ch in chunks if ch.choices and ch.choices[0].logprobs for r in ch.choices[0].logprobs.content]
    assert [r.logprob for r in per_chunk] == pytest.approx(streamed.response_logprobs, abs=1e-6)
    assert "top_logprobs needs logprobs: true" in bad["no logprobs"]
    assert "stream" in bad["streamed"] and "top_logprobs" in bad["too many"]


class Choice(pydantic.BaseModel):
    colour: Literal["red", "blue"]
    sure: bool


def test_structured_output_and_forced_tool_calls_are_enforced(make_gateway, engine):
    # The tiny random model writes no JSON of its own: every well-formed answer here is the grammar's.
    gw = make_gateway(engine)
    ask = [{"role": "user", "content": "pick one"}]
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "sure": {"type": "boolean"}},
              "required": ["colour", "sure"]}
    tools = [{"type": "function", "function": {"name": "paint", "parameters": schema}},
             {"type": "function", "function": {"name": "wait", "parameters": {"type": "object", "properties": {}}}}]
    with ServerThread(gw) as server:
        c = client(server)
        shaped = c.chat.completions.create(
            model="tiny", messages=ask, max_tokens=60, temperature=1.0, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "choice", "schema": schema}})
        anything = c.chat.completions.create(model="tiny", messages=ask, max_tokens=60, temperature=0,
                                             response_format={"type": "json_object"})
        # the SDK's own structured-output path: a pydantic model in, a parsed instance out
        parsed = c.chat.completions.parse(model="tiny", messages=ask, max_tokens=60, seed=5,
                                          response_format=Choice).choices[0].message.parsed
        named = c.chat.completions.create(model="tiny", messages=ask, tools=tools, max_tokens=200, seed=2,
                                          tool_choice={"type": "function", "function": {"name": "paint"}})
        required = c.chat.completions.create(model="tiny", messages=ask, tools=tools, max_tokens=200, seed=3,
                                             tool_choice="required")
        streamed = list(c.chat.completions.create(model="tiny", messages=ask, tools=tools, max_tokens=200, seed=4,
                                                  tool_choice={"type": "function", "function": {"name": "paint"}},
                                                  stream=True))
        refusals = {}
        for what, extra in {"unknown tool": {"tools": tools, "tool_choice": {"type": "function",
                                                                            "function": {"name": "fly"}}},
                            "no tools": {"tool_choice": "required"},
                            "bad schema": {"response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}}.items():
            with pytest.raises(openai.BadRequestError) as refused:
                c.chat.completions.create(model="tiny", messages=ask, max_tokens=8, **extra)
            refusals[what] = str(refused.value)
    assert isinstance(parsed, Choice) and parsed.colour in ("red", "blue")
    value = json.loads(shaped.choices[0].message.content)
    assert value["colour"] in ("red", "blue") and isinstance(value["sure"], bool) and set(value) == {"colour", "sure"}
    assert shaped.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    call = named.choices[0].message.tool_calls[0]
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "paint"
    assert json.loads(call.function.arguments)["colour"] in ("red", "blue")
    assert [tc.function.name for tc in required.choices[0].message.tool_calls] in (["paint"], ["wait"])
    calls = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "paint" and json.loads("".join(tc.function.arguments or "" for tc in calls))
    assert "'fly'" in refusals["unknown tool"] and "needs tools" in refusals["no tools"]
    assert 'cannot be enforced: Unsupported type "nonsense"' in refusals["bad schema"]
    recorded = turns(gw)   # the constraint is recorded with the turn; refused requests record nothing
    assert len(recorded) == 6 and all(t.sampling.grammar for t in recorded)


def test_sampling_left_out_follows_the_models_generation_config(make_gateway, tiny_model_dir, tmp_path):
    import shutil

    from serving.local import LocalEngine
    from serving.models import sampling_defaults

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0.3,
                                                              "top_k": 1, "top_p": 7}))
    assert sampling_defaults(model) == {"temperature": 0.3, "top_k": 1}   # top_p 7 is no probability
    eng = LocalEngine(ServingSettings(max_batch_size=4), model_dir=model)
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "defaults"}], "max_tokens": 12}
    try:
        gw, plain = make_gateway(eng), make_gateway(eng, sampling_defaults="openai")
        with ServerThread(gw) as server:
            c = client(server)
            left_out = c.chat.completions.create(**ask, seed=1)
            greedy = c.chat.completions.create(**ask, temperature=0)
            given = c.chat.completions.create(**ask, temperature=1.0, seed=2, extra_body={"top_k": -1})
        with ServerThread(plain) as server:
            client(server).chat.completions.create(**ask, seed=1)
    finally:
        asyncio.run(eng.close())
    model_default, _, explicit = turns(gw)
    assert (model_default.sampling.temperature, model_default.sampling.top_p, model_default.sampling.top_k) == (0.3, 1.0, 1)
    assert left_out.choices[0].message.content == greedy.choices[0].message.content   # top_k 1 is greedy
    assert (explicit.sampling.temperature, explicit.sampling.top_k) == (1.0, 0)
    openai_default = turns(plain)[0]
    assert (openai_default.sampling.temperature, openai_default.sampling.top_k) == (1.0, 0)


def test_episode_headers_put_a_turn_in_its_rollout_and_partial_ones_are_refused(make_gateway, engine):
    gw = make_gateway(engine)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2}
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}
    episode = {"X-Task-Id": "t-7", "X-Group-Id": "g-7", "X-Rollout-Index": "3", "X-Env": "toolcall",
               "X-Env-Version": "1", "X-Attempt": "2"}
    with ServerThread(gw) as server, httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        assert c.post("/v1/chat/completions", json=body, headers=episode).status_code == 200
        partial = c.post("/v1/chat/completions", json=body, headers={"X-Task-Id": "t-7"})
        bad_index = c.post("/v1/chat/completions", json=body, headers={**episode, "X-Rollout-Index": "-1"})
        too_big = c.post("/v1/chat/completions", json=body, headers={**episode, "X-Attempt": str(2**31)})
        plain = c.post("/v1/chat/completions", json=body)
    assert partial.status_code == 400 and "X-Group-Id" in partial.json()["error"]["message"]
    assert bad_index.status_code == 400 and "x-rollout-index" in bad_index.json()["error"]["message"]
    assert too_big.status_code == 400 and "2147483647" in too_big.json()["error"]["message"]
    assert plain.status_code == 200
    with_episode, without = turns(gw)
    ep = with_episode.episode
    assert (ep.task_id, ep.group_id, ep.rollout_index, ep.env, ep.env_version, ep.attempt) == (
        "t-7", "g-7", 3, "toolcall", "1", 2)
    assert without.episode is None


def test_a_rollouts_turns_and_feedback_are_keyed_by_its_group(make_gateway, engine):
    """A group's rollouts meet in one partition (schemas.events.session_key): the turns, the
    feedback the gateway remembers the group for, the feedback naming it, and the session end."""
    gw = make_gateway(engine)
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2}
    episode = {"X-Task-Id": "t-9", "X-Group-Id": "g-9", "X-Rollout-Index": "0", "X-Session-Id": "roll-a"}
    with ServerThread(gw) as server, httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        assert c.post("/v1/chat/completions", json=body, headers=episode).status_code == 200
        remembered = c.post("/v1/feedback", json={"session_id": "roll-a", "kind": "tool_output", "text": "4"})
        named = c.post("/v1/feedback", json={"session_id": "roll-b", "kind": "tool_output", "text": "5"},
                       headers={"X-Group-Id": "g-9"})
        ended = c.post("/v1/sessions/roll-a/end")
        plain = c.post("/v1/feedback", json={"session_id": "other", "kind": "thumbs", "thumbs": 1})
    assert all(r.status_code == 200 for r in (remembered, named, ended, plain))
    keyed = [(type(s.event).__name__, s.event.session_id, s.key) for s in gw.spool.read(10_000)]
    assert keyed == [("TurnRecorded", "roll-a", "g-9"), ("FeedbackReceived", "roll-a", "g-9"),
                     ("FeedbackReceived", "roll-b", "g-9"), ("FeedbackReceived", "roll-a", "g-9"),
                     ("FeedbackReceived", "other", "other")]


def test_continue_final_message_prefills_the_reply_as_prompt(make_gateway, engine, tokenizer):
    gw = make_gateway(engine)
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "```python\nprint("}]
    body = {"model": "tiny", "messages": msgs, "max_tokens": 4, "continue_final_message": True}
    with ServerThread(gw) as server, httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=body)
        bad = c.post("/v1/chat/completions", json={**body, "messages": msgs[:1]})
        # the next step resends prefill + reply as the assistant's message, and a new prefill
        reply = msgs[-1]["content"] + r.json()["choices"][0]["message"]["content"]
        nxt = [msgs[0], {"role": "assistant", "content": reply}, {"role": "user", "content": "Output:\n4"},
               msgs[-1]]
        r2 = c.post("/v1/chat/completions", json={**body, "messages": nxt})
    assert r.status_code == 200, r.text
    assert r2.status_code == 200, r2.text
    first, second = turns(gw)
    assert (second.session_id, second.turn_index) == (first.session_id, 1)   # one derived session
    assert first.continue_final_message and second.continue_final_message
    assert bad.status_code == 400 and "continue_final_message" in bad.json()["error"]["message"]
    t = first
    assert tokenizer.decode(t.prompt_token_ids).endswith("```python\nprint(")   # the prefill is prompt
    assert r.json()["choices"][0]["message"]["content"] == t.response_text      # the reply continues it
    assert json.loads(t.messages_json)[-1] == msgs[-1]
    assert t.turn_index == 0   # the prefill is not a reply already in the session's history


def test_nextstate_openclaw_writes_the_provider_and_checks_the_pairing(make_gateway, engine, tmp_path):
    """The command against a running gateway: the config carries the key, the served context and
    the session headers; a small context brings the small profile; the check is a side turn."""
    import subprocess
    import sys

    from producers.openclaw import SMALL_PROFILE_BELOW, Served, openclaw_config
    from tests.processors.helpers import REPO

    gw = make_gateway(engine)
    target = tmp_path / "openclaw.json"
    target.write_text(json.dumps({"gateway": {"port": 18789}, "models": {"providers": {"other": {"api": "x"}}}}))
    with ServerThread(gw) as server:
        run = subprocess.run([sys.executable, "-m", "infra.cli", "openclaw", "--url", server.url, "--key", KEYS["acme"],
                              "--write", str(target)], cwd=REPO, capture_output=True, text=True, timeout=120)
        refused = subprocess.run([sys.executable, "-m", "infra.cli", "openclaw", "--url", server.url, "--key", "wrong"],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    written = json.loads(target.read_text())
    provider = written["models"]["providers"]["nextstate"]
    assert written["gateway"] == {"port": 18789} and "other" in written["models"]["providers"]   # merged, kept
    assert provider["apiKey"] == KEYS["acme"] and provider["baseUrl"] == f"{server.url}/v1"
    [model] = provider["models"]
    assert model["contextWindow"] == engine.info().max_context
    assert model["compat"] == {"sendSessionIdHeader": True, "sendSessionAffinityHeaders": True}
    assert written["agents"]["defaults"]["model"]["primary"] == "nextstate/policy"
    assert "pairing checked" in run.stdout
    [checked] = turns(gw)
    assert checked.turn_type is TurnType.SIDE   # the check never trains
    assert refused.returncode == 1 and "401" in refused.stderr
    small, dropped = openclaw_config("http://x", "k", Served("m", 8192, 0))
    assert small["tools"]["allow"] == ["read", "write", "edit", "exec"] and dropped
    assert small["agents"]["defaults"]["skipBootstrap"] is True
    big, none = openclaw_config("http://x", "k", Served("m", SMALL_PROFILE_BELOW, 0))
    assert "tools" not in big and none == []
