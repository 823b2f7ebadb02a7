"""Checkpoint files against the real MinIO: upload with a manifest, download verified, and a
cached copy of a different checkpoint at the same place is never served."""

from __future__ import annotations

import pytest

from infra.checkpoints import download_verified, upload_dir
from infra.errors import StorageError
from infra.storage import storage_client

pytestmark = pytest.mark.stack


def _dir(path, content: bytes):
    path.mkdir(parents=True)
    (path / "weights").mkdir()
    (path / "weights" / "a.bin").write_bytes(content)
    return path


def test_download_checks_every_file_and_the_cache_knows_what_it_holds(settings, bucket, tmp_path):
    client = storage_client(settings.storage)
    one = upload_dir(client, bucket, "ns1/run/v00000001/", _dir(tmp_path / "one", b"first"))
    two = upload_dir(client, bucket, "ns2/run/v00000001/", _dir(tmp_path / "two", b"second"))
    dest = tmp_path / "cache" / "run" / "v1"  # the same place for both, on purpose
    got = download_verified(client, f"s3://{bucket}/ns1/run/v00000001/", one, dest)
    assert (got / "weights" / "a.bin").read_bytes() == b"first"
    got = download_verified(client, f"s3://{bucket}/ns2/run/v00000001/", two, dest)
    assert (got / "weights" / "a.bin").read_bytes() == b"second"

    forged = [f.model_copy(update={"sha256": "0" * 64}) for f in two]
    with pytest.raises(StorageError, match="sha256"):
        download_verified(client, f"s3://{bucket}/ns2/run/v00000001/", forged, tmp_path / "other")
    assert not (tmp_path / "other").exists()
