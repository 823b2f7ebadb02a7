"""The sharded connection pools of infra.http: a response keeps its shard busy until its body
is closed, so open streams spread over the shards instead of queueing on the first."""

from __future__ import annotations

import asyncio

import httpx

from infra.http import POOL_SHARD, RetryOnFreshConnection


class FakePool(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(200, stream=httpx.ByteStream(b"data"))


def test_open_streams_spread_over_shards_and_release_on_close():
    transport = RetryOnFreshConnection(httpx.Limits(max_connections=4 * POOL_SHARD))
    assert len(transport.pools) == 4
    transport.pools = [FakePool() for _ in transport.pools]

    async def main() -> None:
        request = httpx.Request("POST", "http://engine/generate")
        open_ = [await transport.handle_async_request(request) for _ in range(4)]
        assert [p.requests for p in transport.pools] == [1, 1, 1, 1]   # one stream per shard
        assert transport._busy == [1, 1, 1, 1]
        for response in open_:
            assert await response.aread() == b"data"
            await response.aclose()
            await response.aclose()                                     # released once
        assert transport._busy == [0, 0, 0, 0]

    asyncio.run(main())


def test_the_shards_share_one_tls_context():
    # httpx would build one per transport (loading the CA bundle each time, on the event loop);
    # a client of many shards, and each retry's fresh transport, use the one built once.
    transport = RetryOnFreshConnection(httpx.Limits(max_connections=4 * POOL_SHARD))
    contexts = {id(pool._pool._ssl_context) for pool in transport.pools}
    assert len(transport.pools) == 4 and contexts == {id(transport._ssl)}
