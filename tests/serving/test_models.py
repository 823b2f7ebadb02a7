"""Model resolution: the packaged SmolLM2 GGUF is found without importing its package, HF
directories are used as they are, bad specs fail clearly, and the GGUF conversion is cached
(the slow test converts once per user cache, then loads the safetensors copy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from infra.errors import ConfigError
from serving.models import COMPLETE_MARKER, conversion_dir, packaged_smollm2_gguf, resolve_model


def test_packaged_gguf_is_found() -> None:
    gguf = packaged_smollm2_gguf()
    assert gguf.suffix == ".gguf" and "SmolLM2-135M-Instruct" in gguf.name and gguf.stat().st_size > 50e6


def test_hf_directory_is_used_as_is(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model_dir), tmp_path) == tiny_model_dir


def test_bad_specs_say_what_they_saw(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve_model(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


def test_conversion_dir_is_keyed_by_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert conversion_dir(a, tmp_path) != conversion_dir(b, tmp_path)
    b.write_bytes(b"one")
    assert conversion_dir(a, tmp_path).name.split("-")[-1] == conversion_dir(b, tmp_path).name.split("-")[-1]


@pytest.mark.slow
def test_default_model_converts_once_and_answers(settings) -> None:
    from infra.settings import ServingSettings
    from schemas.events import SamplingParams
    from serving.local import LocalEngine

    path = resolve_model(None, settings.serving.cache_dir)  # converts on first use (~35-60 s)
    assert (path / COMPLETE_MARKER).exists() and (path / "model.safetensors").exists()
    assert resolve_model("smollm2", settings.serving.cache_dir) == path
    engine = LocalEngine(ServingSettings(), model_dir=path)
    try:
        tok = engine.tokenizer
        assert tok.chat_template and engine.info().max_context == 8192
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=True)["input_ids"]
        gen = asyncio.run(engine.generate(list(prompt), SamplingParams(temperature=0.0, max_new_tokens=16)))
        assert "Paris" in tok.decode(gen.token_ids) and gen.finish_reason == "stop"
    finally:
        asyncio.run(engine.close())
