"""`nextstate serve` as a real process: it loads the engine, answers over HTTP (reached with
engine=remote), hot-swaps a checkpoint published by hand on the real stack, and exits
cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from infra.settings import ServingSettings
from schemas.events import SamplingParams
from tests.conftest import wait_for
from tests.serving.helpers import full_variant, publish_checkpoint
from tests.serving.test_remote import free_port

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def health(url: str) -> dict | None:
    try:
        resp = httpx.get(url + "/health", timeout=2)
        return resp.json() if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


def test_serve_answers_and_hot_swaps(settings, namespace, bucket, tiny_model_dir, tmp_path: Path) -> None:
    from serving.remote import RemoteEngine

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "NEXTSTATE_SERVING__CACHE_DIR": str(tmp_path / "cache")}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "serve", "--model", str(tiny_model_dir),
                             "--namespace", namespace, "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: health(url) or proc.poll() is not None, 120, 0.2, "nextstate serve to answer")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        remote = RemoteEngine(ServingSettings(engine="remote", engine_url=url))
        # seeded: an unseeded draw from the random tiny model can hit EOS before 4 tokens
        gen = asyncio.run(remote.generate([1, 2, 3], SamplingParams(max_new_tokens=4, seed=0)))
        assert gen.policy_version == 0 and len(gen.token_ids) == 4

        publish_checkpoint(settings, namespace, bucket, full_variant(tiny_model_dir, tmp_path / "v1", 1), 1, "FULL")
        wait_for(lambda: (health(url) or {}).get("policy_version") == 1, 60, 0.2, "v1 to be served")
        gen = asyncio.run(remote.generate([1, 2, 3], SamplingParams(max_new_tokens=4, seed=0)))
        assert gen.policy_version == 1 and remote.info().policy_version == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
