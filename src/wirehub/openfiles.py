"""The open-file limit (``RLIMIT_NOFILE``): every client socket is a file.

Most systems start a process with a soft limit of 1,024 open files and a far
higher hard one. Past the soft limit ``accept()`` fails, and libuv sheds the
connection it cannot accept (it closes a spare descriptor, accepts and
closes at once): the client sees a reset, and nothing is answered or
counted. ``wirehub serve`` and the load generator lift the soft limit to the
hard one, as Go's runtime does for every program; ``Admission`` keeps the
connections it admits within what remains (docs/security.md).
"""

from __future__ import annotations

import resource

# What ``lift`` asks for when the hard limit is unlimited (the kernel's usual
# ceiling, fs.nr_open).
_UNLIMITED_TARGET = 1 << 20


def limit() -> int | None:
    """The soft limit on open files, or None when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def lift() -> int | None:
    """Raise the soft limit to the hard one (as far as the kernel allows);
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):   # above fs.nr_open: keep what we have
            pass
    return limit()
