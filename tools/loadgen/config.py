"""One run's settings, and who does what in which worker process.

``Config`` is built once by the CLI and pickled to every worker. The layout
functions are pure so that the runner (which adds up what was sent) and the
workers (which send and receive) agree on channels and streams without
talking about it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from .payload import channel_name

MODES = ("echo", "fanout", "connect")
PROTOCOLS = ("wirehub", "raw")
CODECS = ("json", "tlv")


@dataclass(frozen=True)
class Config:
    """Settings of a run; see ``cli.build_parser`` for what each one means."""

    mode: str
    url: str = "ws://127.0.0.1:8080/ws"
    protocol: str = "wirehub"
    codec: str = "json"
    binary: bool = False
    connections: int = 100
    inflight: int = 1
    publishers: int = 1
    subscribers: int = 100
    channels: int = 1
    size: int = 64
    window: int = 32
    rate: float = 0.0
    duration_s: float = 5.0
    warmup_s: float = 1.0
    drain_s: float = 3.0
    procs: int = 1
    concurrency: int = 200
    hold_s: float = 0.0
    connect_timeout_s: float = 10.0
    max_errors: int = 0
    server_pid: int = 0
    channel_prefix: str = field(default_factory=lambda: "lg-" + secrets.token_hex(4))

    @property
    def senders(self) -> int:
        """Connections that send numbered messages (publishers or echo clients)."""
        return {"echo": self.connections, "fanout": self.publishers}.get(self.mode, 0)

    @property
    def receivers(self) -> int:
        """Connections that only receive (fan-out subscribers)."""
        return self.subscribers if self.mode == "fanout" else 0

    @property
    def streams(self) -> int:
        """Ordered streams a subscriber tracks: its channel, or every raw publisher."""
        return self.publishers if self.protocol == "raw" else 1


def mine(total: int, worker: int, procs: int) -> range:
    """Global indices of the connections that worker ``worker`` owns."""
    return range(worker, total, procs)


def publisher_channels(cfg: Config, pub: int) -> range:
    """Channel indices publisher ``pub`` rotates over, in sending order."""
    if cfg.publishers >= cfg.channels:
        return range(pub % cfg.channels, pub % cfg.channels + 1)
    return range(pub, cfg.channels, cfg.publishers)


def subscriber_channel(cfg: Config, sub: int) -> int:
    """Channel index subscriber ``sub`` joins."""
    return sub % cfg.channels


def channel(cfg: Config, index: int) -> str:
    """Channel name of a channel index (unique per run, so offsets start at 1)."""
    return channel_name(cfg.channel_prefix, index)
