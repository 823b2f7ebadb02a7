"""The object store (MinIO or any S3): a client built from the storage section, and the
checkpoint bucket. Knows nothing about checkpoints' contents."""

from __future__ import annotations

from minio import Minio
from minio.error import S3Error

from infra.errors import StorageError
from infra.settings import StorageSettings


def storage_client(storage: StorageSettings) -> Minio:
    return Minio(
        storage.endpoint,
        access_key=storage.access_key,
        secret_key=storage.secret_key.get_secret_value() if storage.secret_key else None,
        secure=storage.secure,
        region=storage.region,
    )


def ensure_bucket(storage: StorageSettings, bucket: str | None = None) -> bool:
    """Create the bucket if it is missing; True if it was created."""
    name = bucket or storage.bucket
    client = storage_client(storage)
    try:
        if client.bucket_exists(name):
            return False
        client.make_bucket(name, location=storage.region)
        return True
    except (S3Error, OSError) as exc:
        raise StorageError(f"cannot ensure bucket {name!r} at {storage.endpoint}: {exc}") from exc
