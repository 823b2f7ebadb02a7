"""Per-tenant API keys: stored hashed, compared in constant time.

`GatewaySettings.api_keys` maps tenant -> key. A value of the form `sha256:<64 hex>` is the
hash of the key (what should be stored; `nextstate gateway hash-key` prints it); any other
value is a raw key, hashed here at start and not kept in clear. A request's Bearer key is
hashed and compared with every tenant's hash by `hmac.compare_digest`, all of them, so
neither the match nor its position shows in the timing.

With profile=local and no keys configured, a random key for the default tenant is generated
once into `GatewaySettings.dev_key_file` (mode 0600) and reused on later starts; `nextstate
gateway` prints where it is. Other profiles refuse to start without keys (infra.settings).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from infra.errors import ConfigError
from infra.settings import GatewaySettings

_HASHED = re.compile(r"^sha256:([0-9a-f]{64})$")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """tenant -> sha256 digest of its key; `tenant_for(key)` says whose key it is."""

    def __init__(self, hashed: dict[str, str]) -> None:
        self._digests: list[tuple[str, bytes]] = []
        for tenant, value in hashed.items():
            m = _HASHED.match(value)
            if not m:
                raise ConfigError(f"api key of tenant {tenant!r} is not 'sha256:<64 hex>'")
            self._digests.append((tenant, bytes.fromhex(m.group(1))))
        if not self._digests:
            raise ConfigError("the gateway needs at least one API key")

    @classmethod
    def from_settings(cls, gateway: GatewaySettings, local: bool) -> "KeyRing":
        values = {t: s.get_secret_value().strip() for t, s in gateway.api_keys.items()}
        if not values:
            if not local:
                raise ConfigError("no gateway API keys configured (NEXTSTATE_GATEWAY__API_KEYS)")
            values = {gateway.tenant: dev_key(gateway.dev_key_file)}
        return cls({t: v if _HASHED.match(v) else hash_key(v) for t, v in values.items()})

    @property
    def tenants(self) -> list[str]:
        return [t for t, _ in self._digests]

    def tenant_for(self, presented: str | None) -> str | None:
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for tenant, expected in self._digests:
            if hmac.compare_digest(digest, expected) and found is None:
                found = tenant
        return found


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def dev_key(path: Path) -> str:
    """The local development key in `path`, created (0600) on first use."""
    path = Path(path)
    if path.exists():
        key = path.read_text().strip()
        if key:
            return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "ns-local-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key
