# cython: freethreading_compatible = True
"""Token buckets: the per-connection rate limits of the receive path.

The clock is passed in (``now`` in seconds, any monotonic origin) so the
bucket is a pure function of its inputs and the tests need no sleeps.
Reference twin: ``wirehub._pure.bucket``.
"""


cdef class TokenBucket:
    """Allow ``rate`` units per second on average and bursts up to ``burst``.

    A ``rate`` of 0 disables the bucket: ``consume`` always succeeds.
    """

    def __init__(self, double rate, double burst, double now=0.0):
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must be >= 0")
        if rate > 0 and burst <= 0:
            raise ValueError("burst must be > 0 when rate is set")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated_at = now

    cpdef bint consume(self, double amount, double now):
        """Take ``amount`` tokens if available; return whether they were."""
        if self.rate == 0:
            return True
        if now > self.updated_at:
            self.tokens += (now - self.updated_at) * self.rate
            if self.tokens > self.burst:
                self.tokens = self.burst
            self.updated_at = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False
