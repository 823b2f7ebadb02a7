"""A durable local spool of events on their way to Kafka, and the thread that drains it.

Every event the gateway records is first appended here (fsync'd before the client gets its
answer), then `SpoolDrainer` ships the spool to Kafka in order and moves a durable drain
position past what Kafka acknowledged. So the gateway keeps answering while Kafka is down,
nothing recorded is lost, and a restarted gateway drains what an earlier process spooled.

Layout under the spool directory:
- `seg-<n>.log`: append-only segments; one event per line, `<crc32 hex> <json>\\n`, where the
  json is `{"type": event name, "key": partition key, "event": the event as JSON}`;
- `position.json`: the drain position (segment, byte offset), replaced atomically;
- `lock`: an exclusive flock, so two processes never drain one spool.

A torn last line (a crash mid-write) is cut off when the spool opens; a corrupt line in the
middle is copied to `corrupt.log` and skipped, never silently dropped. Segments wholly
behind the drain position are deleted.

A record Kafka refuses for good (larger than the broker takes, refused by its schema) would
block every record behind it. When a batch fails that way, the drainer sends its records one
by one, copies each refused one to `set-aside.log` (`<json reason>\t<spool line>`, fsync'd
before the position moves past it), reports it as a `DeadLettered` event (stage
`gateway-spool`, without the value: that is what was too large) and counts it; the records
behind it flow. A failure that a retry may cure (Kafka down, a timeout) is retried as before.

Delivery is at-least-once into Kafka and exactly-once for consumers that drop repeated
`event_id`s: a crash between Kafka's ack and the position update, or a batch that Kafka
took only partly before failing, is sent again with the same event ids.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from infra.errors import GatewayError
from infra.kafka import refused_for_good
from schemas.catalog import TOPICS
from schemas.events import EVENT_TYPES, DeadLettered, Event

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


@dataclass(frozen=True)
class Spooled:
    event: Event
    key: str | None
    end: Position  # the position just after this record


def encode(event: Event, key: str | None) -> bytes:
    payload = orjson.dumps({"type": type(event).__name__, "key": key,
                            "event": event.model_dump(mode="json")})
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def decode(line: bytes) -> tuple[Event, str | None]:
    """One spool line back into its event; ValueError if the line is damaged."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        raise ValueError("line is truncated or unframed")
    payload = line[9:-1]
    if int(line[:8], 16) != zlib.crc32(payload):
        raise ValueError("checksum mismatch")
    record = orjson.loads(payload)
    return EVENT_TYPES[record["type"]].model_validate(record["event"]), record["key"]


class Spool:
    def __init__(self, directory: Path, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._lockfile = (self.dir / "lock").open("a+")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise GatewayError(f"spool {self.dir} is in use by another process") from None
        self._lock = threading.Lock()
        self._data = threading.Condition(self._lock)
        segments = self._segments()
        self.position = self._read_position(segments)
        self._head = max([self.position.segment, *segments])
        self._recover_tail()
        self._file = (self.dir / self._name(self._head)).open("ab")
        self.depth = sum(1 for _ in self._scan(self.position))
        self.appended = 0
        self._sync_lock = threading.Lock()   # one fsync at a time; see append
        self._written = self._synced = 0     # appends written / known durable, in order
        self.fsyncs = self.group_commits_joined = 0

    # -- files ----------------------------------------------------------------------------
    @staticmethod
    def _name(segment: int) -> str:
        return f"seg-{segment:012d}.log"

    def _segments(self) -> list[int]:
        return sorted(int(p.name[4:16]) for p in self.dir.glob("seg-*.log"))

    def _read_position(self, segments: list[int]) -> Position:
        path = self.dir / "position.json"
        if path.exists():
            data = json.loads(path.read_text())
            return Position(int(data["segment"]), int(data["offset"]))
        return Position(segments[0] if segments else 0, 0)

    def _recover_tail(self) -> None:
        path = self.dir / self._name(self._head)
        if not path.exists():
            return
        # Only the last line can be torn by a crash; a bad line before it is corruption,
        # left for `read` to set aside, so the good records after it are never cut.
        good, last = 0, b""
        with path.open("rb") as fh:
            for line in fh:
                good, last = good + len(line), line
        try:
            if last:
                decode(last)
        except (ValueError, KeyError):
            good -= len(last)
        if good < path.stat().st_size:
            log.warning("spool %s: cutting a torn tail of %d bytes", path, path.stat().st_size - good)
            with path.open("r+b") as fh:
                fh.truncate(good)
                os.fsync(fh.fileno())

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- writing --------------------------------------------------------------------------
    def append(self, items: Sequence[tuple[Event, str | None]]) -> None:
        """Durably append events (written and fsync'd when this returns).

        Group commit: concurrent callers write under the lock, then one of them fsyncs for
        everyone whose write came before its fsync began; the others find their write covered
        and return without an fsync of their own. One fsync per event (the old way) put every
        concurrent request in a queue of fsyncs."""
        data = b"".join(encode(event, key) for event, key in items)
        with self._lock:
            if self._file.tell() >= self.segment_bytes:
                os.fsync(self._file.fileno())   # what the old segment holds is durable first
                self._synced = self._written
                self._file.close()
                self._head += 1
                self._file = (self.dir / self._name(self._head)).open("ab")
                self._fsync_dir()
            self._file.write(data)
            self._file.flush()
            self._written += 1
            mine = self._written
            self.depth += len(items)
            self.appended += len(items)
        with self._sync_lock:
            with self._lock:
                if self._synced >= mine:
                    self.group_commits_joined += 1
                    self._notify()
                    return
                upto, fd = self._written, os.dup(self._file.fileno())
            try:
                os.fsync(fd)   # the dup stays valid if a rotation closes the file meanwhile
            finally:
                os.close(fd)
            with self._lock:
                self._synced = max(self._synced, upto)
                self.fsyncs += 1
                self._notify()

    def _notify(self) -> None:
        self._data.notify_all()   # caller holds self._lock

    def wait(self, timeout: float) -> bool:
        """Block until something is waiting to be drained (or timeout); True if so."""
        with self._lock:
            if self.depth == 0:
                self._data.wait(timeout)
            return self.depth > 0

    # -- reading and draining ---------------------------------------------------------------
    def _scan(self, start: Position):
        for segment in [s for s in self._segments() if s >= start.segment]:
            path = self.dir / self._name(segment)
            with path.open("rb") as fh:
                offset = start.offset if segment == start.segment else 0
                fh.seek(offset)
                for line in fh:
                    offset += len(line)
                    if not line.endswith(b"\n"):
                        return  # being written right now
                    yield line, Position(segment, offset)

    def read(self, limit: int) -> list[Spooled]:
        """Up to `limit` records after the drain position, in order."""
        out: list[Spooled] = []
        for line, end in self._scan(self.position):
            try:
                event, key = decode(line)
            except (ValueError, KeyError) as exc:
                log.error("spool %s: corrupt record before %s (%s); kept in corrupt.log", self.dir, end, exc)
                with (self.dir / "corrupt.log").open("ab") as bad:
                    bad.write(line)
                self.ack(end, 1)
                continue
            out.append(Spooled(event, key, end))
            if len(out) >= limit:
                break
        return out

    def ack(self, end: Position, count: int) -> None:
        """Move the drain position to `end` (durably) after `count` records were delivered."""
        tmp = self.dir / "position.json.tmp"
        with tmp.open("w") as fh:
            json.dump({"segment": end.segment, "offset": end.offset}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / "position.json")
        self._fsync_dir()
        with self._lock:
            self.position = end
            self.depth = max(0, self.depth - count)
            head = self._head
        for segment in self._segments():
            if segment < end.segment and segment != head:
                (self.dir / self._name(segment)).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._file.close()
        fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._lockfile.close()


class SpoolDrainer:
    """Ships the spool to Kafka in order; on any failure it drops the producer and retries.

    `producer_factory` builds a fresh `infra.kafka.EventProducer` (or anything with
    `send(event, key=)` and `flush(timeout)` raising on failure); a new one is made after
    each failure, so pointing the factory elsewhere reconnects the drainer.
    """

    def __init__(self, spool: Spool, producer_factory: Callable[[], object], batch_size: int = 256,
                 flush_timeout_s: float = 20.0, retry_max_s: float = 5.0) -> None:
        self.spool = spool
        self.producer_factory = producer_factory
        self.batch_size = batch_size
        self.flush_timeout_s = flush_timeout_s
        self.retry_max_s = retry_max_s
        self.delivered = 0
        self.failures = 0
        self.set_aside = 0
        self.last_set_aside: str | None = None
        self.last_error: str | None = None
        self.connected = False
        self._producer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "SpoolDrainer":
        self._thread = threading.Thread(target=self._run, name="spool-drainer", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop; first give Kafka up to `drain_timeout_s` to take what is spooled."""
        deadline = time.monotonic() + drain_timeout_s
        while (self.spool.depth and time.monotonic() < deadline
               and self._thread is not None and self._thread.is_alive()):
            self._stop.wait(0.05)
        self._stop.set()
        with self.spool._lock:
            self.spool._data.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.flush_timeout_s + 5)

    def drain_once(self) -> int:
        """Send one batch and move the position past it; how many were delivered."""
        batch = self.spool.read(self.batch_size)
        if not batch:
            return 0
        if self._producer is None:
            self._producer = self.producer_factory()
        for i, item in enumerate(batch):
            try:
                self._producer.send(item.event, key=item.key)
            except Exception as exc:   # refused before it left (too large here, or by its schema)
                if not refused_for_good(exc):
                    raise
                delivered = i
                try:
                    self._producer.flush(self.flush_timeout_s)   # the ones before it
                except Exception as before:
                    if not refused_for_good(before):
                        raise
                    self._producer = None        # one before it was refused by the broker too
                    delivered = self._one_by_one(batch[:i])
                else:
                    if i:
                        self.spool.ack(batch[i - 1].end, i)
                        self.delivered += i
                self._set_aside(item, exc)
                self.spool.ack(item.end, 1)
                return delivered
        try:
            self._producer.flush(self.flush_timeout_s)
        except Exception as exc:
            if not refused_for_good(exc):
                raise
            self._producer = None   # refused by the broker: find which, one record at a time
            return self._one_by_one(batch)
        self.spool.ack(batch[-1].end, len(batch))
        self.delivered += len(batch)
        self.connected = True
        return len(batch)

    def _one_by_one(self, batch: list[Spooled]) -> int:
        """Deliver `batch` a record at a time, setting aside each one Kafka refuses for good.
        Records sent again here that had gone through in the batch keep their event ids."""
        delivered = 0
        for item in batch:
            if self._producer is None:
                self._producer = self.producer_factory()
            try:
                self._producer.send(item.event, key=item.key)
                self._producer.flush(self.flush_timeout_s)
                delivered += 1
                self.delivered += 1
            except Exception as exc:
                if not refused_for_good(exc):
                    raise   # retried later from this record; those before it are acknowledged
                self._producer = None
                self._set_aside(item, exc)
            self.spool.ack(item.end, 1)
        self.connected = True
        return delivered

    def _set_aside(self, item: Spooled, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        name = type(item.event).__name__
        log.error("spool: %s %s refused for good, set aside in %s: %s", name,
                  getattr(item.event, "event_id", "?"), self.spool.dir / "set-aside.log", reason)
        with (self.spool.dir / "set-aside.log").open("ab") as fh:
            fh.write(orjson.dumps({"reason": reason, "event": name}) + b"\t" + encode(item.event, item.key))
            fh.flush()
            os.fsync(fh.fileno())
        self.set_aside += 1
        self.last_set_aside = reason
        letter = DeadLettered.of(
            "gateway-spool", TOPICS.get(name, name), -1, -1, item.key.encode() if item.key else None, None,
            f"{reason}; the record is kept in {self.spool.dir / 'set-aside.log'}",
            parent_ids=[getattr(item.event, "event_id", "")])
        try:
            if self._producer is None:
                self._producer = self.producer_factory()
            self._producer.send(letter, key=item.key)
            self._producer.flush(self.flush_timeout_s)
        except Exception:  # noqa: BLE001 - the record is kept on disk; the report is best effort
            log.exception("spool: could not report the set-aside record on dead-letters")
            self._producer = None

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            if not self.spool.wait(0.5):
                continue
            try:
                self.drain_once()
                backoff = 0.2
            except Exception as exc:  # Kafka or registry unreachable, refused, timed out
                self.failures += 1
                self.connected = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("spool drain failed (%d event(s) kept, retry in %.1fs): %s",
                            self.spool.depth, backoff, self.last_error)
                self._producer = None  # a fresh producer (and connection) next time
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
