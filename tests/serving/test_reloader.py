"""The reloader's pure choices: which checkpoint to load from a batch of events, and which
files serving downloads."""

from __future__ import annotations

from schemas.events import CheckpointFile, CheckpointKind, CheckpointPublished
from serving.reloader import candidates, serving_files


def event(version: int, run: str = "main") -> CheckpointPublished:
    return CheckpointPublished(run=run, version=version, kind=CheckpointKind.LORA, base_model="m",
                               uri=f"s3://b/{run}/v{version:08d}/", files=[], consumed_offsets=[],
                               step=version, samples_trained=0)


def test_newest_first_only_newer_than_served_and_not_bad() -> None:
    events = [event(3), event(5), event(1), event(4), event(5), event(6, run="other")]
    picked = candidates(events, current=3, run="main", bad={("main", 4)})
    assert [e.version for e in picked] == [5]
    assert [e.version for e in candidates(events, 0, None, set())] == [6, 5, 4, 3, 1]
    assert candidates(events, current=6, run=None, bad=set()) == []


def test_only_weights_are_downloaded_from_the_learner_layout() -> None:
    files = [CheckpointFile(path=p, sha256="0" * 64, size_bytes=1) for p in
             ("weights/config.json", "weights/model.safetensors", "train_state/global_step1/optim.pt")]
    chosen, sub = serving_files(files)
    assert sub == "weights" and [f.path for f in chosen] == files_paths(files[:2])
    flat = [CheckpointFile(path="adapter_config.json", sha256="0" * 64, size_bytes=1),
            CheckpointFile(path="train_state/x", sha256="0" * 64, size_bytes=1)]
    chosen, sub = serving_files(flat)
    assert sub == "" and [f.path for f in chosen] == ["adapter_config.json"]


def files_paths(files: list[CheckpointFile]) -> list[str]:
    return [f.path for f in files]
