"""teacher_policy=current means the policy served now: the hint worker's teacher engine follows
`checkpoints` like the gateway's, and HintJudged records which version scored. Against the
real stack: a LoRA checkpoint is published to MinIO and Kafka, then a hint worker
(`nextstate process hint`, a subprocess) scores a corrected transition."""

from __future__ import annotations

import pytest

from infra.kafka import EventProducer
from schemas.events import HintJudged
from serving.bench_swap import lora_adapter, publish_checkpoint
from tests.conftest import wait_for
from tests.processors.helpers import Collector, StageProcess, transition

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_a_current_teacher_scores_with_the_newest_published_checkpoint(settings, registry, namespace, bucket,
                                                                       tiny_model_dir, tmp_path):
    s = settings.model_copy(update={"storage": settings.storage.model_copy(update={"bucket": bucket})})
    publish_checkpoint(s, namespace, bucket, lora_adapter(tiny_model_dir, tmp_path / "v3", 3), 3, "LORA", run="served")
    worker = StageProcess("hint", namespace, tmp_path / "faust", tmp_path / "hint.log",
                          NEXTSTATE_PROCESSORS__HINT_JUDGE="feedback",
                          NEXTSTATE_PROCESSORS__TEACHER_MODEL=str(tiny_model_dir),
                          NEXTSTATE_PROCESSORS__TEACHER_POLICY="current",
                          NEXTSTATE_SERVING__CHECKPOINT_RUN="served",
                          NEXTSTATE_SERVING__CACHE_DIR=str(tmp_path / "cache"),
                          NEXTSTATE_STORAGE__BUCKET=bucket).start()
    try:
        wait_for(lambda: "serving LORA checkpoint v3 of run served" in worker.tail(20_000), 180,
                 what=f"the hint worker's teacher to load v3; log:\n{worker.tail()}")
        producer = EventProducer(settings.kafka, registry, namespace=namespace)
        t = transition("No, I said print hello world instead, with a newline")
        producer.send(t, key=t.session_id)
        producer.flush()
        out = Collector(settings, registry, namespace, "HintJudged")
        wait_for(lambda: out.events(HintJudged), 120, what=f"a HintJudged; log:\n{worker.tail()}")
        [hint] = out.events(HintJudged)
    finally:
        worker.stop()
    assert hint.accepted_hint and hint.teacher_policy == "current"
    assert hint.teacher_policy_version == 3 and len(hint.teacher_logprobs) == len(t.turn.response_token_ids)
