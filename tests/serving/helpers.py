"""Helpers for the serving tests: checkpoint builders and publishing (shared with
`nextstate bench swap`, re-exported here), a reference model, and an async wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from serving.bench_swap import Load, Outcome, full_variant, lora_adapter, publish_checkpoint  # noqa: F401


async def until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Await `condition()` becoming truthy (the scheduler thread updates state just after it
    emits a request's last token)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


def reference_model(base_dir: Path, adapter: Path | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model
