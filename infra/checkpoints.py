"""Checkpoint files in the object store: upload a directory with a sha256 manifest, and
download one back verifying every file. Shared by the learner (publishes) and the serving
reloader (fetches). Knows nothing about training or engines.

Layout: ``s3://<bucket>/<run>/v<version:08d>/<files...>`` plus ``manifest.json`` listing
each file's path, sha256 and size. The ``CheckpointPublished`` event carries the same list.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from infra.errors import StorageError
from schemas.events import CheckpointFile

if TYPE_CHECKING:   # the client is the caller's: hashing a local file needs no object store
    from minio import Minio

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_prefix(run: str, version: int) -> str:
    return f"{run}/v{version:08d}/"


def parse_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise StorageError(f"checkpoint uri {uri!r} is not an s3:// uri")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix


def upload_dir(client: Minio, bucket: str, prefix: str, directory: Path) -> list[CheckpointFile]:
    """Upload every file under `directory`, then the manifest last (its presence means whole)."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        digest = sha256_file(path)
        try:
            client.fput_object(bucket, prefix + rel, str(path))
        except Exception as exc:
            raise StorageError(f"upload of {rel} to s3://{bucket}/{prefix} failed: {exc}") from exc
        files.append(CheckpointFile(path=rel, sha256=digest, size_bytes=path.stat().st_size))
    manifest = json.dumps([f.model_dump() for f in files], indent=1).encode()
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(manifest)
        tmp.flush()
        client.fput_object(bucket, prefix + MANIFEST, tmp.name, content_type="application/json")
    return files


def download_verified(client: Minio, uri: str, files: list[CheckpointFile], dest: Path) -> Path:
    """Fetch each listed file into `dest` and check its sha256; raise on any mismatch.

    Files land in a temporary sibling directory that is renamed into place only when every
    file has been verified, so `dest` never holds a half-written checkpoint.
    """
    bucket, prefix = parse_uri(uri)
    dest = Path(dest)
    # The marker names exactly which files were verified: a cached copy of some other
    # checkpoint that happens to sit at `dest` is fetched anew, never served.
    stamp = hashlib.sha256("\n".join(sorted(f"{f.path}:{f.sha256}" for f in files)).encode()).hexdigest()
    marker = dest / ".verified"
    if marker.exists() and marker.read_text().strip() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest.parent))
    try:
        for f in files:
            target = staging / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.fget_object(bucket, prefix + f.path, str(target))
            except Exception as exc:
                raise StorageError(f"download of {uri}{f.path} failed: {exc}") from exc
            got = sha256_file(target)
            if got != f.sha256:
                raise StorageError(
                    f"checkpoint file {uri}{f.path} has sha256 {got[:12]}…, "
                    f"the event says {f.sha256[:12]}…"
                )
        (staging / ".verified").write_text(stamp)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        return dest
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
