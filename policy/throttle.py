"""Failed-login throttling per account and per client IP (SPEC §9), shared by SMTP and IMAP
in one process. Pure and in memory: a sliding window of failure times."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class LoginThrottle:
    """After ``max_failures`` failures in ``window`` seconds, an account or IP is throttled
    until the oldest failure leaves the window. A success clears the account's record."""

    #: Most keys remembered; the oldest are forgotten first (bounded memory under attack).
    MAX_KEYS = 100_000

    def __init__(self, max_failures: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float] | None:
        entries = self._failures.get(key)
        if entries is None:
            return None
        horizon = self.clock() - self.window
        while entries and entries[0] <= horizon:
            entries.popleft()
        if not entries:
            del self._failures[key]
            return None
        return entries

    def blocked(self, account: str, ip: str) -> bool:
        for key in (f"a:{account.lower()}", f"i:{ip}"):
            entries = self._recent(key)
            if entries is not None and len(entries) >= self.max_failures:
                return True
        return False

    def failure(self, account: str, ip: str) -> None:
        now = self.clock()
        for key in (f"a:{account.lower()}", f"i:{ip}"):
            entries = self._failures.get(key)
            if entries is None:
                if len(self._failures) >= self.MAX_KEYS:
                    self._failures.pop(next(iter(self._failures)))
                entries = self._failures[key] = deque(maxlen=self.max_failures * 2)
            entries.append(now)

    def success(self, account: str) -> None:
        self._failures.pop(f"a:{account.lower()}", None)
