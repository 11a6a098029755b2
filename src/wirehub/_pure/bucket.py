"""Token bucket (reference of ``_ext.bucket``)."""

from __future__ import annotations


class TokenBucket:
    """Allow ``rate`` units per second on average and bursts up to ``burst``; rate 0 = unlimited."""

    __slots__ = ("rate", "burst", "tokens", "updated_at")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must be >= 0")
        if rate > 0 and burst <= 0:
            raise ValueError("burst must be > 0 when rate is set")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated_at = float(now)

    def consume(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if available; return whether they were."""
        if self.rate == 0:
            return True
        if now > self.updated_at:
            self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.rate)
            self.updated_at = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False
