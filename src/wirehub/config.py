"""Gateway configuration: one validated Struct, from TOML, environment and flags.

Precedence, lowest first: defaults, the TOML file (``--config``), ``WIREHUB_*``
environment variables, command-line flags. Every layer is validated by
msgspec against ``Config``; an error names the key and where it came from.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional

import msgspec

from .protocol.patterns import PatternError, check_pattern, compile_pattern

KiB = 1024
MiB = 1024 * KiB

NonNegative = msgspec.Meta(ge=0)
Positive = msgspec.Meta(gt=0)


class ChannelOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """How the channels ``pattern`` covers keep and deliver their publications.

    Set as ``[[channels]]`` tables in the TOML file or ``--channel
    'PATTERN:key=value,...'``; the first pattern that covers a channel wins,
    and a channel no pattern covers gets these defaults (docs/delivery.md).
    """

    pattern: str = "**"
    history_size: Annotated[int, NonNegative] = 0          # publications kept; 0: no history
    history_ttl_s: Annotated[float, NonNegative] = 0.0     # 0: kept until size or bytes push them out
    history_max_bytes: Annotated[int, NonNegative] = 0     # per channel; 0: only the global cap
    slow_consumer: Literal["disconnect", "drop_oldest", "conflate"] = "disconnect"
    max_queue_bytes: Annotated[int, Positive] = 1 * MiB    # held per subscriber (drop_oldest, conflate)
    max_rate: Annotated[float, NonNegative] = 0.0          # highest max_rate a subscribe may ask; 0: no cap

    def __post_init__(self) -> None:
        try:
            check_pattern(self.pattern)
        except PatternError as exc:
            raise ValueError(f"channel pattern: {exc}") from None


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything ``wirehub serve`` can be told. See ``HELP`` for each field."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    ws_path: str = "/ws"
    echo: bool = False
    max_payload_bytes: Annotated[int, Positive] = 1 * MiB
    max_fragments: Annotated[int, Positive] = 131_072
    max_subscriptions_per_connection: Annotated[int, Positive] = 128
    max_channel_length: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 255
    max_pending_handlers_per_connection: Annotated[int, Positive] = 32
    ping_interval_s: Annotated[float, Positive] = 20.0
    ping_timeout_s: Annotated[float, Positive] = 20.0
    rate_limit_messages_per_s: Annotated[float, NonNegative] = 10_000.0
    rate_limit_burst_messages: Annotated[float, NonNegative] = 20_000.0
    rate_limit_bytes_per_s: Annotated[float, NonNegative] = 64.0 * MiB
    rate_limit_burst_bytes: Annotated[float, NonNegative] = 128.0 * MiB
    rate_limit_violations_per_s: Annotated[float, NonNegative] = 10.0
    rate_limit_burst_violations: Annotated[float, NonNegative] = 100.0
    high_water_bytes: Annotated[int, Positive] = 4 * MiB
    fanout_pace_max_s: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.001
    close_timeout_s: Annotated[float, Positive] = 2.0
    shutdown_timeout_s: Annotated[float, Positive] = 5.0
    handshake_timeout_s: Annotated[float, Positive] = 5.0
    read_buffer_bytes: Annotated[int, msgspec.Meta(ge=2048)] = 2 * KiB
    deflate: bool = True
    deflate_level: Annotated[int, msgspec.Meta(ge=-1, le=9)] = 6
    deflate_mem_level: Annotated[int, msgspec.Meta(ge=1, le=9)] = 8
    deflate_server_max_window_bits: Annotated[int, msgspec.Meta(ge=9, le=15)] = 15
    deflate_client_max_window_bits: Annotated[int, msgspec.Meta(ge=8, le=15)] = 15
    deflate_server_no_context_takeover: bool = True
    deflate_client_no_context_takeover: bool = False
    deflate_threshold_bytes: Annotated[int, NonNegative] = 1024
    deflate_max_ratio: Annotated[int, NonNegative] = 100
    jwt_secret: Optional[str] = None
    jwt_public_key: Optional[str] = None
    jwks: Optional[str] = None
    jwt_algorithms: list[str] = []
    jwt_audience: Optional[str] = None
    jwt_issuer: Optional[str] = None
    jwt_leeway_s: Annotated[float, NonNegative] = 5.0
    auth_timeout_s: Annotated[float, Positive] = 10.0
    token_expiring_notice_s: Annotated[float, NonNegative] = 30.0
    allow_anonymous: bool = False
    default_subscribe: list[str] = []
    default_publish: list[str] = []
    allowed_origins: list[str] = []
    max_connections: Annotated[int, NonNegative] = 100_000
    listen_backlog: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 4096
    max_connections_per_ip: Annotated[int, NonNegative] = 10_000
    new_connections_per_ip_per_s: Annotated[float, NonNegative] = 1_000.0
    new_connections_burst_per_ip: Annotated[float, NonNegative] = 2_000.0
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16_000)] = 8 * KiB
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    pure_hot_path: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    log_format: Literal["text", "json"] = "text"
    docker: bool = False
    docker_host: str | None = None
    runner_label: str | None = None
    docker_log_ring_lines: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    docker_max_log_streams: Annotated[int, Positive] = 256
    channels: list[ChannelOptions] = []
    history_max_bytes: Annotated[int, Positive] = 256 * MiB
    idempotency_window_s: Annotated[float, NonNegative] = 120.0
    idempotency_max_keys: Annotated[int, Positive] = 100_000
    metrics_interval_s: Annotated[float, Positive] = 5.0
    # The HTTP publish API (http_api.py), on a listener of its own.
    api_port: Optional[Annotated[int, msgspec.Meta(ge=0, le=65535)]] = None
    api_host: str = "127.0.0.1"
    api_key: list[str] = []
    api_jwt: bool = False
    api_rate_limit_per_s: Annotated[float, NonNegative] = 10_000.0
    api_rate_limit_burst: Annotated[float, NonNegative] = 20_000.0
    api_request_timeout_s: Annotated[float, Positive] = 10.0
    api_idle_timeout_s: Annotated[float, Positive] = 60.0
    # File transfer (files.py): off without a directory.
    file_dir: Optional[str] = None
    file_window: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    file_max_bytes: Annotated[int, Positive] = 4 * 1024 * MiB
    file_quota_bytes: Annotated[int, NonNegative] = 16 * 1024 * MiB
    file_partial_ttl_s: Annotated[float, Positive] = 86_400.0
    # Where publications travel: the embedded memory broker, or Redis (docs/scaling.md).
    broker: Optional[str] = None
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    reuse_port: bool = False

    @property
    def auth_enabled(self) -> bool:
        """Whether a verification key is configured (connections need a token)."""
        return bool(self.jwt_secret or self.jwt_public_key or self.jwks)

    def __post_init__(self) -> None:
        if self.high_water_bytes <= self.max_payload_bytes:
            raise ValueError(
                f"high_water_bytes ({self.high_water_bytes}) must exceed "
                f"max_payload_bytes ({self.max_payload_bytes}) so one message always fits")
        for rate, burst in (("rate_limit_messages_per_s", "rate_limit_burst_messages"),
                            ("rate_limit_bytes_per_s", "rate_limit_burst_bytes"),
                            ("rate_limit_violations_per_s", "rate_limit_burst_violations"),
                            ("api_rate_limit_per_s", "api_rate_limit_burst")):
            if getattr(self, rate) > 0 and getattr(self, burst) <= 0:
                raise ValueError(f"{burst} must be > 0 when {rate} is set")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not self.auth_enabled:
            for name in ("jwt_algorithms", "jwt_audience", "jwt_issuer", "default_subscribe",
                         "default_publish", "api_jwt"):
                if getattr(self, name):
                    raise ValueError(f"{name} needs a key: set jwt_secret, jwt_public_key or jwks")
        for pattern in (*self.default_subscribe, *self.default_publish):
            try:
                compile_pattern(pattern)
            except PatternError as exc:
                raise ValueError(str(exc)) from None
        if self.broker is not None and self.broker != "memory":
            from .broker.redis import check_urls
            check_urls(self.broker)
        if self.workers > 1:
            if self.broker in (None, "memory"):
                raise ValueError(f"workers = {self.workers} needs a shared broker (--broker redis://HOST:PORT/DB): "
                                 f"on the memory broker each worker would see only its own clients' publications")
            if self.port == 0 or self.api_port == 0:
                raise ValueError("workers share one port: give port (and api_port) a number, not 0")


HELP: dict[str, str] = {
    "host": "interface to listen on",
    "port": "TCP port (0 picks a free one)",
    "ws_path": "path of the WebSocket endpoint",
    "echo": "enable the /echo diagnostics endpoint (echoes every message through the production path)",
    "max_payload_bytes": "largest message accepted; larger closes with 1009",
    "max_fragments": "most frames one fragmented message may have",
    "max_subscriptions_per_connection": "subscriptions one connection may hold",
    "max_channel_length": "longest channel name, in characters",
    "max_pending_handlers_per_connection": ("async application handlers (Gateway.on) one connection "
                                            "may have running; more are answered rate_limited"),
    "ping_interval_s": "idle seconds before the server pings a client",
    "ping_timeout_s": "seconds a client has to answer a ping before it is closed with 1001",
    "rate_limit_messages_per_s": "messages per second per connection (0 = unlimited)",
    "rate_limit_burst_messages": "message burst per connection",
    "rate_limit_bytes_per_s": "inbound bytes per second per connection (0 = unlimited)",
    "rate_limit_burst_bytes": "inbound byte burst per connection",
    "rate_limit_violations_per_s": "refused messages per second tolerated before closing with 1008",
    "rate_limit_burst_violations": "refused-message burst tolerated before closing with 1008",
    "high_water_bytes": "pending outbound bytes past which a slow consumer is closed with 1013",
    "fanout_pace_max_s": "longest wait between two fan-out flushes under load (0: flush every tick)",
    "close_timeout_s": "seconds to wait for the peer's CLOSE before dropping TCP",
    "shutdown_timeout_s": ("seconds SIGTERM/SIGINT may take: clients get 80 %% of it to close, then the "
                           "process exits, saturated or not (a second signal exits at once)"),
    "handshake_timeout_s": "seconds a new TCP connection has to complete the upgrade",
    "listen_backlog": ("connections the kernel queues before the gateway accepts them (capped by "
                       "net.core.somaxconn); a reconnect storm after a restart overflows a small one "
                       "and its clients wait a 1 s SYN retry"),
    "read_buffer_bytes": "initial per-connection read buffer (grows on demand)",
    "deflate": "accept permessage-deflate (RFC 7692) offers",
    "deflate_level": "zlib compression level, -1 to 9",
    "deflate_mem_level": "zlib memLevel, 1 to 9 (8: 128 KiB per compressor)",
    "deflate_server_max_window_bits": "largest window the server compresses with, 9 to 15",
    "deflate_client_max_window_bits": "largest window asked of clients, 8 to 15",
    "deflate_server_no_context_takeover": "compress each message on its own, so one compressed frame is shared by "
                                          "every subscriber (off: a compressor per connection)",
    "deflate_client_no_context_takeover": "ask clients to compress each message on its own",
    "deflate_threshold_bytes": "messages shorter than this are sent uncompressed",
    "deflate_max_ratio": "refuse (1009) a message inflating past this ratio once it exceeds 1 MiB (0 = off)",
    "jwt_secret": "shared secret for HS256/384/512 tokens (enables authentication)",
    "jwt_public_key": "PEM file with the RSA or EC public key for RS*/PS*/ES* tokens (enables authentication)",
    "jwks": "JWKS file whose keys verify tokens, chosen by the token's kid (enables authentication)",
    "jwt_algorithms": "accepted token algorithms, repeatable or comma-separated (default: all the keys support)",
    "jwt_audience": "required 'aud' claim",
    "jwt_issuer": "required 'iss' claim",
    "jwt_leeway_s": "clock skew tolerated on exp, nbf and iat",
    "auth_timeout_s": "seconds a connection without a token has to send an 'auth' message before 1008",
    "token_expiring_notice_s": "seconds before 'exp' that 'token_expiring' asks the client for a fresh token",
    "allow_anonymous": "with a key configured, let connections without a token in (default_* patterns only)",
    "default_subscribe": "channel patterns every connection may subscribe to on top of its token, repeatable",
    "default_publish": "channel patterns every connection may publish to on top of its token, repeatable",
    "allowed_origins": "accepted Origin header values, repeatable (default: any origin)",
    "max_connections": "open connections in all; more are answered 503 (0 = unlimited)",
    "max_connections_per_ip": "open connections per client IP; more are answered 429 (0 = unlimited)",
    "new_connections_per_ip_per_s": "new connections per second per client IP; more are answered 429 (0 = unlimited)",
    "new_connections_burst_per_ip": "new-connection burst per client IP",
    "max_header_bytes": "largest upgrade request head; larger is answered 431 (at most 16000: picows drops heads of 16 KiB)",
    "tls_cert": "PEM certificate chain file: serve wss:// (with tls_key)",
    "tls_key": "PEM private key file for tls_cert",
    "pure_hot_path": ("start even if the compiled hot path does not import, on its pure-Python twins "
                      "(several times slower); WIREHUB_NO_EXTENSIONS=1 asks for them outright"),
    "log_level": "debug, info, warning or error",
    "log_format": "text or json (one JSON object per line)",
    "docker": "serve Docker channels: logs:<container>, runners, runner:<id> (needs the docker extra)",
    "docker_host": "Docker engine address, e.g. unix:///var/run/docker.sock; unset: DOCKER_HOST and the SDK's defaults",
    "runner_label": "only containers with this label (key or key=value) are runners",
    "docker_log_ring_lines": "log lines kept per followed container: the largest tail a subscriber may ask",
    "docker_max_log_streams": "containers whose logs are followed at once",
    "channels": ("delivery options of the channels a pattern covers, repeatable: "
                 "'PATTERN:key=value,...' with history_size, history_ttl_s, history_max_bytes, "
                 "slow_consumer (disconnect, drop_oldest, conflate), max_queue_bytes, max_rate; "
                 "the first pattern that covers a channel wins (docs/delivery.md)"),
    "broker": ("where publications travel: unset or 'memory' for the embedded broker (one process), or "
               "redis://[:PASSWORD@]HOST:PORT/DB (also rediss://, unix://) to share channels, offsets and "
               "history with every gateway on that Redis; several such URLs separated by commas spread the "
               "channels over those Redis servers, listed in the same order on every gateway (docs/scaling.md)"),
    "workers": ("gateway processes on the port (SO_REUSEPORT), started and restarted by 'wirehub serve'; "
                "more than 1 needs a shared broker (docs/scaling.md)"),
    "reuse_port": ("listen with SO_REUSEPORT, so that several processes share the port "
                   "(set for each of --workers)"),
    "history_max_bytes": ("memory for all channels' history; past it the least recently published "
                          "channels lose theirs"),
    "idempotency_window_s": ("seconds a publish's idempotency_key is remembered: a retry with the same "
                             "key on the same channel is answered with the first one's offset and dropped "
                             "(0: keys are ignored)"),
    "idempotency_max_keys": "idempotency keys remembered at once, across channels; past it the oldest go first",
    "metrics_interval_s": ("seconds between two metrics_update messages on $sys:metrics, sent only while "
                           "someone is subscribed (docs/operations.md)"),
    "api_port": ("TCP port of the HTTP publish API (POST /api/publish, /api/broadcast, /api/batch; "
                 "docs/operations.md); unset: no API (0 picks a free port)"),
    "api_host": "interface the HTTP API listens on (loopback by default: producers run beside the gateway)",
    "api_key": ("key a producer sends to the HTTP API (X-API-Key or Authorization: Bearer), repeatable; "
                "it may publish on every channel a client may"),
    "api_jwt": ("accept the gateway's tokens on the HTTP API too: a token publishes where its publish "
                "claims allow (needs jwt_secret, jwt_public_key or jwks)"),
    "api_rate_limit_per_s": ("publications per second per API key, token subject or (open API) client IP "
                             "over HTTP; more are answered 429 (0 = unlimited)"),
    "api_rate_limit_burst": "HTTP API publication burst per API key, token subject or client IP",
    "api_request_timeout_s": ("seconds an HTTP API request has from its first byte to its last; "
                              "slower is answered 408 and closed"),
    "api_idle_timeout_s": "seconds an HTTP API keep-alive connection may wait between two requests",
    "file_dir": ("directory for uploaded files (file_begin/file_chunk/file_end, docs/protocol.md); "
                 "unset: file transfer is off. Downloads: GET /files/<id> on the HTTP API's port"),
    "file_window": ("chunks a client may have unacknowledged; a connection with more waiting for the "
                    "disk stops being read"),
    "file_max_bytes": "largest file one upload may carry",
    "file_quota_bytes": "bytes one uploader's files (partial and complete) may hold in file_dir (0 = no quota)",
    "file_partial_ttl_s": "seconds an unfinished upload is kept without a new chunk before it is deleted",
}

ENV_PREFIX = "WIREHUB_"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and its source."""


def field_names() -> tuple[str, ...]:
    return Config.__struct_fields__


def list_fields() -> frozenset[str]:
    """Fields holding a list (repeatable flags, comma-separated environment values)."""
    hints = typing.get_type_hints(Config)
    return frozenset(name for name in field_names() if typing.get_origin(hints[name]) is list)


def split_list(values: str | list[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``."""
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_channel(text: str) -> dict[str, str]:
    """``"prices.*:history_size=100,slow_consumer=conflate"`` -> the fields of a ``ChannelOptions``.

    The pattern may hold ``:`` itself (``logs:**:history_size=100``): it ends
    at the last ``:`` before the first ``=``.

    Raises:
        ConfigError: no ``key=value`` after the pattern, or an item without ``=``.
    """
    equals = text.find("=")
    colon = text.rfind(":", 0, equals) if equals > 0 else -1
    if colon <= 0:
        raise ConfigError(f"invalid configuration: channels: {text!r} is not PATTERN:key=value,...")
    options: dict[str, str] = {"pattern": text[:colon]}
    for item in text[colon + 1:].split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid configuration: channels: {item!r} in {text!r} is not key=value")
        options[key.strip()] = value.strip()
    return options


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``WIREHUB_<FIELD>`` variables, keyed by field name (``WIREHUB_CHANNELS``
    holds ``--channel`` values separated by ``;``)."""
    lists = list_fields()
    values: dict[str, Any] = {}
    for name in field_names():
        value = environ.get(ENV_PREFIX + name.upper())
        if value is None:
            continue
        if name == "channels":
            values[name] = [parse_channel(item.strip()) for item in value.split(";") if item.strip()]
        else:
            values[name] = split_list(value) if name in lists else value
    return values


def load(path: str | None = None, *, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a ``Config`` from a TOML file, the environment and explicit overrides.

    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong type
            or range; the message says which key and where it was set.
    """
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                file_values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key in file_values:
            if key not in field_names():
                raise ConfigError(f"config file {path}: unknown key {key!r}")
            source[key] = f"config file {path}"
        merged.update(file_values)
    env_values = from_env(os.environ if environ is None else environ)
    merged.update(env_values)
    source.update({k: f"environment variable {ENV_PREFIX}{k.upper()}" for k in env_values})
    for key, value in (overrides or {}).items():
        if key == "channels":
            value = [parse_channel(item) if isinstance(item, str) else item for item in value]
        merged[key] = value
        source[key] = "--channel" if key == "channels" else f"--{key.replace('_', '-')}"
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(str(exc), source)) from None


def _describe(reason: str, source: Mapping[str, str]) -> str:
    match = re.search(r" - at `\$\.(\w+)([^`]*)`$", reason)
    if match is None:
        return f"invalid configuration: {reason}"
    key, path = match.group(1), match.group(1) + match.group(2)   # channels[0].history_size
    where = source.get(key, "default")
    detail = reason[:match.start()]
    hints = typing.get_type_hints(ChannelOptions if key == "channels" else Config)
    field = path.rsplit(".", 1)[-1] if key == "channels" else key
    choices = typing.get_args(hints.get(field))
    if detail.startswith("Invalid enum value") and choices:
        detail += f" (choose from: {', '.join(map(str, choices))})"
    return f"invalid configuration: {path} (from {where}): {detail}"
