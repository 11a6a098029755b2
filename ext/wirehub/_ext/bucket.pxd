cdef class TokenBucket:
    cdef readonly double rate
    cdef readonly double burst
    cdef readonly double tokens
    cdef readonly double updated_at

    cpdef bint consume(self, double amount, double now)
