"""The object store away at checkpoint time (the soak stopped MinIO while the learner was
publishing, and the learner exited): the loop keeps training, keeps the unpublished steps'
ledger lines, and publishes them all with the next checkpoint once the store answers again."""

from __future__ import annotations

from types import SimpleNamespace

from infra.errors import StorageError
from infra.settings import Settings
from learner.bench import bench_samples
from learner.checkpointing import RunState
from learner.feeder import StepFeeder
from learner.loop import LearnerLoop, Ledger, Until
from learner.metrics import MetricsSink
from learner.sources import MemorySampleSource
from learner.trainer import Trainer


class FlakyStore:
    """Refuses the first `down` publishes like an unreachable object store, then publishes."""

    def __init__(self, down: int) -> None:
        self.down, self.calls, self.published = down, 0, []

    def publish(self, trainer, state: RunState, ledger, metrics):
        self.calls += 1
        if self.calls <= self.down:
            raise StorageError("upload of weights/adapter_model.safetensors failed: connection refused")
        state.version += 1
        self.published.append([dict(line) for line in ledger])
        return SimpleNamespace(version=state.version, step=state.step, uri=f"s3://b/v{state.version}",
                               event_id=f"e{state.version}", run="r", consumed_offsets=[])


def test_an_unreachable_store_delays_the_checkpoint_and_loses_no_step(tiny_model_dir, tmp_path):
    ls = Settings().learner.model_copy(update={
        "device": "cpu", "lora": True, "lora_rank": 4, "token_budget": 32, "grad_accum": 1,
        "checkpoint_every_steps": 1, "fill_timeout_s": 0.1, "run": "retry"})
    trainer = Trainer(ls, tiny_model_dir)
    samples = bench_samples(6, 8, 8, vocab=trainer.engine.module.config.vocab_size)
    source = MemorySampleSource(samples)
    store = FlakyStore(down=1)
    loop = LearnerLoop(trainer, StepFeeder(source, ls, trainer.pad_id, lambda fed, exc: None), ls,
                       RunState(positions=source.start_positions()), store,
                       MetricsSink(tmp_path / "metrics.jsonl", ls.run), Ledger(tmp_path / "ledger.jsonl"))
    state = loop.run(Until(stop_at_end=True))          # no StorageError escapes
    assert state.step >= 3 and store.calls >= 2
    assert store.published, "a checkpoint was published once the store answered"
    assert loop.checkpoint_failures == 0                 # reset by the publish that went through
    steps = [line["step"] for ledger in store.published for line in ledger]
    assert steps == list(range(1, state.step + 1))      # every step in exactly one published ledger
