"""What keeps `eardrum serve` up under clients that open connections and never finish them, and keeps its log
from flooding while that happens.

- `guarded_protocol(settings)`: uvicorn's h11 protocol with the two guards uvicorn lacks. A connection past
  `max_connections` is answered 503 `server_busy` (OpenAI's error shape) the moment it opens, and closed, so
  open files never run out; a connection that has not sent a whole request head within `header_timeout_s`
  (after it opens, or after its previous answer) is closed. The body's deadline, `body_timeout_s`, is kept by
  the request handler, which answers 408 `request_timeout`.
- `RateLimitedLog`: a logging filter that lets each kind of line (logger and message template) through at most
  once per `interval_s`, then says how many like it it held back. Installed on the loggers a storm of bad
  connections writes to: uvicorn's, asyncio's (which reports "Too many open files" on every failed accept) and
  the server's own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai_schema import APIError
from .server_settings import ServerSettings

logger = logging.getLogger(__name__)
FD_RESERVE = 64  # open files kept free of client connections: the model's files, logs, the listening socket
FLOODED_LOGGERS = ("uvicorn.error", "asyncio", "eardrum.inference.server", __name__)


def connection_cap(requested: int) -> int:
    """`requested`, lowered where the process's open-file limit (RLIMIT_NOFILE) would run out first."""
    try:
        import resource
    except ImportError:  # not on this platform: nothing to read
        return requested
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= requested:
        return requested
    cap = max(1, soft - FD_RESERVE)
    logger.warning("max_connections %d lowered to %d: the open-file limit (ulimit -n) is %d", requested, cap, soft)
    return cap


def _busy_response(cap: int) -> bytes:
    error = APIError(503, f"the server has {cap} connections open, its limit (--max-connections); retry shortly",
                     type="server_busy", code="server_busy")
    body = json.dumps(error.body()).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request-head deadline (set by `guarded_protocol`)."""

    max_connections: int = 256
    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio's transport
        super().connection_made(transport)
        self._head_timer = None
        if len(self.connections) > self.max_connections:
            logger.warning("connection refused with 503: %d connections open, the limit", self.max_connections)
            transport.write(_busy_response(self.max_connections))
            transport.close()
            return
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request's head has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:  # set in connection_made, which always comes first
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        waiting_after = self.cycle  # a head that arrives starts a new cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout, waiting_after)

    def _head_timeout(self, waiting_after) -> None:
        self._head_timer = None
        if self.cycle is waiting_after and not self.transport.is_closing():
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.warning("%s sent no complete request head within %g s (--header-timeout); connection closed",
                           peer, self.header_timeout_s)
            self.transport.close()


def guarded_protocol(settings: ServerSettings) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=` with this server's connection cap and head deadline."""
    attributes = {"max_connections": connection_cap(settings.max_connections),
                  "header_timeout_s": settings.header_timeout_s}
    return type("ServerProtocol", (GuardedH11Protocol,), attributes)


class RateLimitedLog(logging.Filter):
    """Each kind of record (logger name and unformatted message) passes at most once per `interval_s`; the
    next one to pass after a quiet spell says how many were held back. Tracebacks of repeated kinds are
    dropped with them."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 1024) -> None:
        super().__init__()
        self.interval_s, self.clock, self.max_kinds = interval_s, clock, max_kinds
        self._kinds: dict[tuple[str, str], list] = {}  # kind -> [time it last passed, records held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg))
        now = self.clock()
        seen = self._kinds.get(kind)
        if seen is not None and now - seen[0] < self.interval_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} [{seen[1]} more like this in the last {now - seen[0]:.0f} s not logged]"
        if seen is None and len(self._kinds) >= self.max_kinds:  # bounded: forget the oldest kind
            self._kinds.pop(next(iter(self._kinds)))
        self._kinds[kind] = [now, 0]
        return True


def limit_log_floods(interval_s: float = 10.0) -> RateLimitedLog:
    """Install one `RateLimitedLog` on the loggers a storm of connections writes to; returns it."""
    limiter = RateLimitedLog(interval_s)
    for name in FLOODED_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in log.filters):
            log.addFilter(limiter)
    return limiter
