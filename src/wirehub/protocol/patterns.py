"""Channel patterns: what a token may touch, and what a pattern subscription follows.

A channel name is split into segments at ``.`` and ``:``. In a pattern, a
segment ``*`` matches exactly one segment and a final ``**`` matches one or
more trailing segments; every other character matches itself, separators
included::

    runner:*        runner:42            (not runner:42:logs, not runner.42)
    logs:**         logs:a, logs:a:b     (not logs)
    telemetry.*.cpu telemetry.node1.cpu
    **              every channel

Wildcards inside a segment (``run*``) are refused rather than guessed at, so
a pattern never matches more than it reads as.

Names that start with ``$`` are *reserved*: the gateway's own channels
(``RESERVED_CHANNELS``, such as ``$sys:metrics``), read with a permission
rather than with channel claims and never written by clients. ``$`` is not a
channel character, so no pattern can name them, and no pattern matches
them: not ``**``, not a token's claims, not a ``[[channels]]`` rule::

    **              every channel but $sys:metrics
"""

from __future__ import annotations

import re
from functools import lru_cache

CHANNEL_CHARS = "A-Za-z0-9_\\-.:@/="
_CHANNEL = re.compile(f"[{CHANNEL_CHARS}]+")
_SEPARATORS = re.compile(r"([.:])")
_ONE_SEGMENT = "[^.:]+"

RESERVED_PREFIX = "$"
METRICS_CHANNEL = "$sys:metrics"
# The reserved channels, each with the permission that reads it (``admin``
# covers every permission; an open gateway's connections read them all).
RESERVED_CHANNELS = {METRICS_CHANNEL: "sys:metrics"}


class PatternError(ValueError):
    """A pattern that is not valid; the message says why."""


def is_pattern(name: str) -> bool:
    """Whether ``name`` holds a wildcard (channel names never contain ``*``)."""
    return "*" in name


def is_channel_name(name: str) -> bool:
    """Whether ``name`` is made of channel characters only (a reserved name is not)."""
    return _CHANNEL.fullmatch(name) is not None


def is_reserved(name: str) -> bool:
    """Whether ``name`` is in the reserved ``$`` namespace (a valid name there or not)."""
    return name[:1] == RESERVED_PREFIX


def reserved_permission(name: str) -> str | None:
    """The permission that reads the reserved channel ``name``; None for any other name."""
    return RESERVED_CHANNELS.get(name)


def check_pattern(pattern: str) -> list[str]:
    """Validate ``pattern`` and return its segments; no regular expression is built.

    The subscription index (``wirehub._ext.routing``) walks these segments, so
    a pattern subscription costs no regex compilation.

    Raises:
        PatternError: empty, a character outside channel names, a wildcard
            inside a segment, or ``**`` anywhere but last.
    """
    if not pattern:
        raise PatternError("empty channel pattern")
    segments = _SEPARATORS.split(pattern)[0::2]
    for i, segment in enumerate(segments):
        if segment == "*":
            continue
        if segment == "**":
            if i != len(segments) - 1:
                raise PatternError(f"pattern {pattern[:64]!r}: '**' must be the last segment")
        elif "*" in segment:
            raise PatternError(f"pattern {pattern[:64]!r}: a wildcard must be a whole segment")
        elif segment and not is_channel_name(segment):
            raise PatternError(f"pattern {pattern[:64]!r} has characters outside [A-Za-z0-9_-.:@/=*]")
    return segments


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression that fully matches the channels ``pattern`` covers.

    For a token's claims (``auth.Principal``), matched once per channel and
    remembered; cached because tokens of many users share the same few patterns.

    Raises:
        PatternError: as ``check_pattern``.
    """
    check_pattern(pattern)
    regex = [f"(?!{re.escape(RESERVED_PREFIX)})"]  # a pattern never matches a reserved name
    for part in _SEPARATORS.split(pattern):
        if part == "*":
            regex.append(_ONE_SEGMENT)
        elif part == "**":
            regex.append(".+")
        else:
            regex.append(re.escape(part))
    return re.compile("".join(regex))


def matches(pattern: str, channel: str) -> bool:
    """Whether ``channel`` is covered by ``pattern`` (which must be valid); never
    true of a reserved name."""
    return compile_pattern(pattern).fullmatch(channel) is not None
