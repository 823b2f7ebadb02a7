"""CONTRACT TEST for the SGLang adapter (no GPU, no SGLang): an in-test fake that speaks
SGLang's documented native HTTP shapes (``/generate`` with ``input_ids``, ``sampling_params``,
``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``, SSE streaming;
``/update_weights_from_disk``; ``/load_lora_adapter``; ``/unload_lora_adapter``;
``/get_model_info``; ``/get_server_info``; ``/health``) checks that our adapter sends what
SGLang expects and parses what SGLang returns. It proves the adapter against the documented
contract, not against a real server: run the engine on a GPU for that."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from infra.errors import ContextLengthError, ServingError
from infra.settings import ServingSettings
from schemas.events import SamplingParams
from serving.engine import Engine, WeightsKind
from serving.sglang import SGLangEngine

pytestmark = pytest.mark.asyncio

VOCAB = 1000
CONTEXT = 256
# Keys SGLang's SamplingParams accepts that our adapter may send.
KNOWN_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "max_new_tokens", "stop",
                  "stop_token_ids", "sampling_seed", "no_stop_trim", "skip_special_tokens", "ebnf"}
KNOWN_GENERATE = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                  "top_logprobs_num", "stream", "lora_path", "rid"}


def next_token(ids: list[int], adapter: str | None, weights: str) -> int:
    """The fake model: deterministic, and different per weights and adapter."""
    salt = sum(map(ord, (adapter or "") + weights))
    return (ids[-1] * 7 + salt + len(ids)) % VOCAB


def token_logprob(pos: int, adapter: str | None) -> float:
    return -0.1 * (pos % 5) - (0.5 if adapter else 0.25)


class FakeSGLang:
    """SGLang's native HTTP surface, answering in its documented shapes."""

    def __init__(self, incremental: bool = False) -> None:
        self.incremental = incremental
        self.weight_version = "default"
        self.weights = "base"
        self.adapters: dict[str, str] = {}
        self.requests: list[tuple[str, dict]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        self.requests.append((path, body))
        if path == "/health":
            return httpx.Response(200)
        if path == "/get_model_info":
            return httpx.Response(200, json={"model_path": "/models/m", "tokenizer_path": "/models/m",
                                             "is_generation": True, "weight_version": self.weight_version})
        if path == "/get_server_info":
            return httpx.Response(200, json={"context_length": CONTEXT, "version": "0.5.x"})
        if path == "/update_weights_from_disk":
            assert isinstance(body["model_path"], str) and body.get("abort_all_requests") is False
            self.weights, self.weight_version = body["model_path"], body.get("weight_version", "default")
            return httpx.Response(200, json={"success": True, "message": "Succeeded to update model weights.",
                                             "num_paused_requests": 0})
        if path == "/load_lora_adapter":
            assert set(body) <= {"lora_name", "lora_path", "pinned"}
            if body["lora_name"] in self.adapters:
                return httpx.Response(400, json={"success": False, "error_message": "already loaded"})
            self.adapters[body["lora_name"]] = body["lora_path"]
            return httpx.Response(200, json={"success": True, "error_message": "",
                                             "loaded_adapters": dict(self.adapters)})
        if path == "/unload_lora_adapter":
            if body["lora_name"] not in self.adapters:
                return httpx.Response(400, json={"success": False, "error_message": "not loaded"})
            del self.adapters[body["lora_name"]]
            return httpx.Response(200, json={"success": True, "loaded_adapters": dict(self.adapters)})
        if path == "/generate":
            return self.generate(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def generate(self, body: dict) -> httpx.Response:
        assert set(body) <= KNOWN_GENERATE, set(body) - KNOWN_GENERATE
        ids = body["input_ids"]
        assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
        sp = body["sampling_params"]
        assert set(sp) <= KNOWN_SAMPLING, set(sp) - KNOWN_SAMPLING
        adapter = body.get("lora_path")
        if adapter is not None and adapter not in self.adapters:
            return httpx.Response(400, json={"error": {"message": f"adapter {adapter} not loaded"}})
        if len(ids) + sp["max_new_tokens"] > CONTEXT:
            return httpx.Response(400, json={"error": {"message": "context too long"}})
        out, seq = [], list(ids)
        for _ in range(sp["max_new_tokens"]):
            tok = next_token(seq, adapter, self.weights)
            out.append([token_logprob(len(seq), adapter), tok, None])
            seq.append(tok)
        meta = {"id": "r1", "prompt_tokens": len(ids), "completion_tokens": len(out),
                "cached_tokens": 0, "weight_version": self.weight_version,
                "finish_reason": {"type": "length", "length": len(out)}}
        if body.get("return_logprob"):
            start = body.get("logprob_start_len", -1)
            start = len(ids) if start is None or start < 0 else start
            meta["input_token_logprobs"] = [
                [None if p == 0 else token_logprob(p, adapter) - 1, ids[p], None] for p in range(start, len(ids))]
            k = body.get("top_logprobs_num") or 0
            meta["input_top_logprobs"] = [
                None if p == 0 else [[-0.01 * (j + 1), (ids[p] + j) % VOCAB, None] for j in range(k)]
                for p in range(start, len(ids))] if k else []
            meta["output_token_logprobs"] = out
        if not body.get("stream"):
            return httpx.Response(200, json={"text": "", "output_ids": [t[1] for t in out], "meta_info": meta})
        chunks = []
        for n in range(1, len(out) + 1, 2):  # SGLang batches tokens into chunks; two per chunk here
            upto = min(n + 1, len(out))
            part = {**meta, "completion_tokens": upto,
                    "finish_reason": meta["finish_reason"] if upto == len(out) else None,
                    "output_token_logprobs": out[n - 1:upto] if self.incremental else out[:upto]}
            chunks.append("data: " + json.dumps({"text": "", "output_ids": [t[1] for t in part["output_token_logprobs"]],
                                                   "meta_info": part}) + "\n\n")
        chunks.append("data: [DONE]\n\n")
        return httpx.Response(200, content="".join(chunks).encode(),
                              headers={"content-type": "text/event-stream"})


def make(fake: FakeSGLang) -> SGLangEngine:
    settings = ServingSettings(engine="sglang", sglang_url="http://sglang.test:30010")
    return SGLangEngine(settings, transport=httpx.MockTransport(fake.handler))


@pytest.fixture(params=[False, True], ids=["cumulative-stream", "incremental-stream"])
def fake(request) -> FakeSGLang:
    return FakeSGLang(incremental=request.param)


def expected(prompt: list[int], n: int, adapter: str | None = None, weights: str = "base"):
    seq, ids, lps = list(prompt), [], []
    for _ in range(n):
        tok = next_token(seq, adapter, weights)
        ids.append(tok)
        lps.append(token_logprob(len(seq), adapter))
        seq.append(tok)
    return ids, lps


async def test_generate_sends_input_ids_and_parses_logprobs(fake) -> None:
    eng = make(fake)
    assert isinstance(eng, Engine)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=3, stop=["\n"])
    gen = await eng.generate([1, 2, 3], params)
    assert (gen.token_ids, gen.logprobs) == expected([1, 2, 3], 5)
    assert gen.finish_reason == "length" and gen.prompt_tokens == 3 and gen.policy_version == 0
    path, body = fake.requests[-1]
    assert path == "/generate" and body["input_ids"] == [1, 2, 3] and body["return_logprob"] is True
    assert body["sampling_params"]["sampling_seed"] == 3 and body["sampling_params"]["stop"] == ["\n"]
    assert eng.info().max_context == CONTEXT
    await eng.generate([1, 2, 3], SamplingParams(max_new_tokens=2, grammar='root ::= "yes" | "no"'))
    assert fake.requests[-1][1]["sampling_params"]["ebnf"] == 'root ::= "yes" | "no"'
    assert "ebnf" not in body["sampling_params"]   # free sampling sends none
    assert "top_k" not in body["sampling_params"]   # 0: all tokens, SGLang's own default
    await eng.generate([1, 2, 3], SamplingParams(max_new_tokens=2, top_k=20))
    assert fake.requests[-1][1]["sampling_params"]["top_k"] == 20
    await eng.close()


async def test_stream_yields_every_token_once(fake) -> None:
    eng = make(fake)
    deltas = [d async for d in eng.stream([9, 8], SamplingParams(max_new_tokens=7))]
    assert [(d.token_id, d.logprob) for d in deltas] == list(zip(*expected([9, 8], 7)))
    assert [d.finish_reason for d in deltas] == [None] * 6 + ["length"]
    assert fake.requests[-1][1]["stream"] is True
    await eng.close()


async def test_score_is_a_prefill_with_input_logprobs(fake) -> None:
    eng = make(fake)
    prompt, cont = [5, 6, 7], [10, 11]
    scores = await eng.score(prompt, cont, top_k=2)
    body = fake.requests[-1][1]
    assert body["sampling_params"]["max_new_tokens"] == 0 and body["input_ids"] == prompt + cont
    assert body["logprob_start_len"] == len(prompt) - 1 and body["top_logprobs_num"] == 2
    assert scores.logprobs == [token_logprob(3, None) - 1, token_logprob(4, None) - 1]
    assert scores.top_ids == [[10, 11], [11, 12]] and len(scores.top_logprobs[0]) == 2
    await eng.close()


async def test_full_swap_uses_update_weights_from_disk(fake) -> None:
    eng = make(fake)
    assert not await eng.relabel(3)   # the start-up weights keep their number
    await eng.load_weights("/ckpt/v3", WeightsKind.FULL, 3)
    path, body = fake.requests[-1]
    assert path == "/update_weights_from_disk"
    assert body == {"model_path": "/ckpt/v3", "weight_version": "3", "abort_all_requests": False,
                    "flush_cache": True}
    gen = await eng.generate([1], SamplingParams(max_new_tokens=3))
    assert gen.policy_version == 3 and gen.token_ids == expected([1], 3, weights="/ckpt/v3")[0]
    assert not await eng.relabel(4)   # SGLang reports full weights' version itself: load them
    with pytest.raises(ServingError, match="FULL swap"):
        await eng.score([1], [2], base=True)
    await eng.close()


async def test_lora_swaps_pin_requests_and_unload_superseded_adapters(fake) -> None:
    eng = make(fake)
    await eng.load_weights("/ckpt/a1", WeightsKind.LORA, 1)
    assert fake.adapters == {"v1": "/ckpt/a1"}
    # a stream pinned to v1 is in flight while v2 lands: it keeps naming v1, v1 stays loaded
    stream = eng.stream([4, 4], SamplingParams(max_new_tokens=4))
    first = await anext(stream)
    await eng.load_weights("/ckpt/a2", WeightsKind.LORA, 2)
    assert set(fake.adapters) == {"v1", "v2"}
    rest = [d async for d in stream]
    assert {d.policy_version for d in [first, *rest]} == {1}
    assert [d.token_id for d in [first, *rest]] == expected([4, 4], 4, adapter="v1")[0]
    assert fake.adapters == {"v2": "/ckpt/a2"}, "v1 should be unloaded once its request ended"
    gen = await eng.generate([4, 4], SamplingParams(max_new_tokens=4))
    assert gen.policy_version == 2 and gen.token_ids == expected([4, 4], 4, adapter="v2")[0]
    assert fake.requests[-1][1]["lora_path"] == "v2"
    base = await eng.score([4], [5], base=True)
    assert "lora_path" not in fake.requests[-1][1] and base.policy_version == 0
    # v3 with v2's files: the v2 adapter answers under the new number, nothing is sent to SGLang
    sent = len(fake.requests)
    assert await eng.relabel(3) and not await eng.relabel(3)
    assert len(fake.requests) == sent and fake.adapters == {"v2": "/ckpt/a2"}
    gen = await eng.generate([4, 4], SamplingParams(max_new_tokens=4))
    assert gen.policy_version == 3 and fake.requests[-1][1]["lora_path"] == "v2"
    await eng.close()


async def test_errors_are_clear(fake) -> None:
    eng = make(fake)
    with pytest.raises(ContextLengthError):
        await eng.generate([1] * 250, SamplingParams(max_new_tokens=10))
    fake.adapters["v5"] = "/x"
    with pytest.raises(ServingError, match="refused adapter|400"):
        await eng.load_weights("/ckpt/again", WeightsKind.LORA, 5)
    assert eng.info().policy_version == 0
    await eng.close()


async def test_launch_command_uses_its_own_python(tmp_path) -> None:
    settings = ServingSettings(engine="sglang", sglang_python=tmp_path / "missing-python",
                               model=str(tmp_path), sglang_args=["--tp", "1"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ServingError, match="does not exist"):
        SGLangEngine(settings)
    eng = SGLangEngine.__new__(SGLangEngine)
    eng.settings, eng.model_dir = settings, tmp_path
    cmd = eng.launch_command()
    assert cmd[:3] == [str(tmp_path / "missing-python"), "-m", "sglang.launch_server"]
    assert cmd[-2:] == ["--tp", "1"] and "--enable-lora" in cmd


async def test_create_engine_picks_sglang_from_settings() -> None:
    from serving import create_engine

    eng = create_engine(ServingSettings(engine="sglang", sglang_url="http://127.0.0.1:1"))
    assert eng.name == "sglang" and eng.url == "http://127.0.0.1:1"
    await eng.close()
    with pytest.raises(Exception, match="Input should be 'local', 'remote' or 'sglang'"):
        ServingSettings(engine="nope")   # refused by the settings, before any engine module loads
    with pytest.raises(Exception, match="not one of"):
        create_engine(ServingSettings().model_copy(update={"engine": "nope"}))
    await asyncio.sleep(0)
