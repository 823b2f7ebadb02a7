"""Prometheus metrics of one gateway, in its own registry (several gateways can share a process).

Requests by route and status, request latency, the gateway's own share of a chat request's
latency (its time outside waits on the engine) and time to first token, prompt and completion
tokens, turns recorded by type, feedback by kind, active sessions, and the spool: depth (events
not yet acknowledged by Kafka), delivered events and failed drain attempts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OWN_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nextstate_gateway_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("nextstate_gateway_request_seconds", "request latency",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.own = Histogram("nextstate_gateway_own_seconds",
                             "what a chat completion spent in the gateway outside waits on the engine",
                             buckets=_OWN_BUCKETS, registry=r)
        self.own_listeners: list[Callable[[float], None]] = []   # every observation, exactly (benchmarks)
        self.first_token = Histogram("nextstate_gateway_first_token_seconds",
                                     "time to the first streamed token", buckets=_LATENCY_BUCKETS,
                                     registry=r)
        self.tokens = Counter("nextstate_gateway_tokens", "tokens", ["kind"], registry=r)
        self.turns = Counter("nextstate_gateway_turns_recorded", "turns recorded", ["turn_type"], registry=r)
        self.feedback = Counter("nextstate_gateway_feedback_recorded", "feedback recorded", ["kind"], registry=r)
        self.sessions = Gauge("nextstate_gateway_sessions_active", "sessions being tracked", registry=r)
        self.spool_depth = Gauge("nextstate_gateway_spool_depth",
                                 "events spooled and not yet acknowledged by Kafka", registry=r)
        self.spool_delivered = Gauge("nextstate_gateway_spool_delivered",
                                     "events delivered to Kafka by this process", registry=r)
        self.spool_failures = Gauge("nextstate_gateway_spool_drain_failures",
                                    "failed attempts to deliver spooled events", registry=r)
        self.spool_set_aside = Gauge("nextstate_gateway_spool_set_aside",
                                     "spooled events Kafka refused for good, kept in set-aside.log", registry=r)

    def bind(self, sessions: Callable[[], float], depth: Callable[[], float],
             delivered: Callable[[], float], failures: Callable[[], float],
             set_aside: Callable[[], float] = lambda: 0) -> None:
        """Read these gauges from their owners at scrape time."""
        self.sessions.set_function(sessions)
        self.spool_depth.set_function(depth)
        self.spool_delivered.set_function(delivered)
        self.spool_failures.set_function(failures)
        self.spool_set_aside.set_function(set_aside)

    def observe_own(self, seconds: float) -> None:
        self.own.observe(seconds)
        for listener in self.own_listeners:
            listener(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
