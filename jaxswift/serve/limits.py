"""Per-client admission: a request-rate limit (`--rate_limit 60/minute`, the `limits` package's moving window) and a
cap on one client's requests in flight (`--max_concurrency`). A client is its API key, or its address without auth,
and the request's `user` when it names one (each end user of an app gets its own share).
Going over either raises `TooManyRequests` (429 with Retry-After); other clients are not affected."""

from __future__ import annotations

import math
import threading
import time

from jaxswift.errors import ConfigError


class TooManyRequests(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


def parse_rate_limit(text: str):
    """`60/minute`, `10/second`, `1000 per hour` -> a limits.RateLimitItem; a ConfigError names the flag otherwise."""
    from limits import parse

    try:
        return parse(text)
    except ValueError:
        raise ConfigError(f"--rate_limit {text!r}: expected COUNT/PERIOD such as 60/minute or 10/second") from None


class ClientLimits:
    """Both limits for every client; `admit(client)` checks them and returns the release callback of the lease."""

    def __init__(self, rate_limit: str | None = None, max_concurrency: int | None = None):
        from limits import storage, strategies

        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigError(f"--max_concurrency must be >= 1, got {max_concurrency}")
        self.rate = parse_rate_limit(rate_limit) if rate_limit else None
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self.max_concurrency = max_concurrency
        self.in_flight: dict[str, int] = {}
        self.lock = threading.Lock()

    def check_rate(self, client: str):
        if self.rate is None or self.limiter.hit(self.rate, client):
            return
        reset = self.limiter.get_window_stats(self.rate, client).reset_time
        raise TooManyRequests(f"rate limit of {self.rate} exceeded", math.ceil(reset - time.time()))

    def admit(self, client: str):
        """Counts one request against both limits; call the returned function (once) when it ends."""
        with self.lock:
            if self.max_concurrency is not None and self.in_flight.get(client, 0) >= self.max_concurrency:
                raise TooManyRequests(f"at most {self.max_concurrency} requests in flight per client", 1)
            self.check_rate(client)
            self.in_flight[client] = self.in_flight.get(client, 0) + 1
        released = threading.Event()

        def release():
            if released.is_set():
                return
            released.set()
            with self.lock:
                self.in_flight[client] -= 1
                if not self.in_flight[client]:
                    del self.in_flight[client]

        return release
