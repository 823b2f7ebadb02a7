"""Fixtures for the gateway tests, imported by name into each test module: the real local
engine on the tiny model, its tokenizer, and gateways built over a per-test spool directory
(helpers live in `helpers.py`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.settings import ServingSettings, Settings
from producers.gateway.auth import KeyRing, hash_key
from producers.gateway.server import build_gateway
from tests.producers.helpers import KEYS


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Iterator[Any]:
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(max_batch_size=16), model_dir=tiny_model_dir)
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing({tenant: hash_key(key) for tenant, key in KEYS.items()})


@pytest.fixture
def make_gateway(settings: Settings, tmp_path: Path, tokenizer: Any, keyring: KeyRing) -> Callable[..., Any]:
    """build(engine, namespace=None, drain=False, producer_factory=None, **gateway_overrides)."""

    def build(engine: Any, namespace: str | None = None, drain: bool = False,
              producer_factory: Callable[[], Any] | None = None, spool_dir: Path | None = None,
              **overrides: Any):
        gw_settings = settings.gateway.model_copy(update={
            "spool_dir": spool_dir or tmp_path / f"spool-{uuid.uuid4().hex[:6]}",
            "delivery_timeout_s": 3.0, "served_model_name": "tiny", **overrides})
        s = settings.model_copy(update={"gateway": gw_settings})
        return build_gateway(s, engine, tokenizer, namespace=namespace, producer_factory=producer_factory,
                             drain=drain, keys=keyring)

    return build


@pytest.fixture(scope="session")
def long_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with a 16k context (RoPE extends): OpenClaw-shaped prompts (12 tools
    described in the prompt, a byte-level tokenizer) need more than the default 2048."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("tiny-long") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def long_engine(long_model_dir: Path) -> Iterator[Any]:
    from serving.local import LocalEngine

    eng = LocalEngine(ServingSettings(max_batch_size=4), model_dir=long_model_dir)
    yield eng
    asyncio.run(eng.close())
