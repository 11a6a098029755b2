"""``wirehub``: the command line, a thin layer over ``wirehub.Gateway``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
import threading
import typing
from typing import Any

import msgspec

from . import config as config_module
from . import garbage, log, openfiles, workers
from .__version__ import __version__
from .config import Config, ConfigError
from .protocol.errors import Unavailable

SERVE_EXAMPLES = """\
examples:
  wirehub serve                                  # 127.0.0.1:8080, endpoint /ws
  wirehub serve --host 0.0.0.0 --port 9000
  wirehub serve --config wirehub.toml            # keys are the option names, e.g. port = 9000
  WIREHUB_MAX_PAYLOAD_BYTES=65536 wirehub serve  # every option has a WIREHUB_* variable
  wirehub serve --echo --log-level info          # enable the /echo diagnostics endpoint
  wirehub serve --channel 'logs:**:history_size=10000' \\
                --channel 'prices.*:history_size=100,slow_consumer=conflate,max_rate=10'

  wirehub serve --jwt-secret "$SECRET"             # clients need a token (docs/security.md)
  wirehub serve --tls-cert cert.pem --tls-key key.pem   # serve wss://

  wirehub serve --api-port 8081 --api-key "$API_KEY"     # HTTP publish API on 127.0.0.1:8081
  curl -H "X-API-Key: $API_KEY" -d '{"channel":"prices.btc","data":{"bid":101.5}}' \\
       http://127.0.0.1:8081/api/publish                 # -> {"channel":...,"offset":1,...,"delivered":3}
  wirehub serve --api-port 8081 --jwt-secret "$SECRET" --api-jwt   # tokens' publish claims decide

  wirehub serve --file-dir /var/lib/wirehub/files --api-port 8081  # uploads on; downloads at
                                                 # http://127.0.0.1:8081/files/<file_id>

  wirehub serve --broker redis://127.0.0.1:6379/0 --port 8080   # gateways on one Redis share
  wirehub serve --broker redis://127.0.0.1:6379/0 --port 8090   # channels, offsets and history
  WIREHUB_BROKER=redis://:$PASSWORD@redis:6379/0 wirehub serve   # (docs/scaling.md)
  wirehub serve --broker redis://127.0.0.1:6379/0 --workers 4     # 4 processes on port 8080
  wirehub serve --broker redis://10.0.0.5:6379/0,redis://10.0.0.6:6379/0   # channels over 2 Redis

precedence: defaults < --config file < WIREHUB_* environment < flags
"""

TOKEN_EXAMPLES = """\
examples:
  wirehub token --secret "$SECRET" --sub alice --subscribe 'runner:*' --subscribe 'logs:**' \\
      --publish 'telemetry.*' --ttl 1h
  WIREHUB_JWT_SECRET=$SECRET wirehub token --sub ops --permission runners:delete --ttl 15m
  wirehub token --config wirehub.toml --sub bob --subscribe 'public.*'   # the secret from the file

The secret comes from --secret, else the same --config / WIREHUB_JWT_SECRET the
gateway reads. The token goes to stdout; pass it as ?token=, Authorization:
Bearer, or in an {"type":"auth","token":...} message.
"""

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` -> seconds."""
    unit = _TTL_UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 90s, 15m, 1h, 2d)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return value


# Short spellings the docs use, next to the generated ``--<field-name>`` flags.
FLAG_ALIASES = {"auth_timeout_s": "--auth-timeout", "channels": "--channel"}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    hints = typing.get_type_hints(Config)
    lists = config_module.list_fields()
    for name in config_module.field_names():
        flags = ["--" + name.replace("_", "-")]
        if name in FLAG_ALIASES:
            flags.append(FLAG_ALIASES[name])
        default = getattr(defaults, name)
        if name == "jwt_secret":
            default = None  # never print a secret
        help_text = f"{config_module.HELP[name]} (default: {default}; env {config_module.ENV_PREFIX}{name.upper()})"
        if hints[name] is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif name in lists:
            metavar = "PATTERN:KEY=VALUE,..." if name == "channels" else "VALUE"
            parser.add_argument(*flags, dest=name, action="append", default=None, metavar=metavar,
                                help=help_text)
        else:
            # Values stay strings here: msgspec validates them with the other layers,
            # so a bad flag and a bad TOML value get the same kind of message.
            metavar = {int: "N", float: "NUM"}.get(hints[name], "VALUE")
            parser.add_argument(*flags, dest=name, default=None, metavar=metavar,
                                help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wirehub", description="Real-time WebSocket pub/sub gateway.",
        epilog="run 'wirehub COMMAND --help' for a command's options")
    parser.add_argument("--version", action="version", version=f"wirehub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the gateway", description="Run the gateway: with the embedded in-memory "
        "broker (the default), or with other gateways as one on Redis (--broker redis://...).",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--config", metavar="FILE", help="TOML file with option values")
    _add_config_options(serve)
    token = commands.add_parser(
        "token", help="mint a development token (HS256)", description="Mint an HMAC-signed JWT "
        "with the gateway's claims, for development and tests.",
        epilog=TOKEN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    token.add_argument("--sub", required=True, help="subject: who the token is for")
    token.add_argument("--subscribe", action="append", default=[], metavar="PATTERN",
                       help="channel pattern the holder may subscribe to (repeatable)")
    token.add_argument("--publish", action="append", default=[], metavar="PATTERN",
                       help="channel pattern the holder may publish to (repeatable)")
    token.add_argument("--permission", action="append", default=[], metavar="NAME",
                       help="permission for custom message types, e.g. runners:delete or admin (repeatable)")
    token.add_argument("--ttl", type=parse_ttl, default=3600.0, metavar="DURATION",
                       help="lifetime, e.g. 90s, 15m, 1h, 2d (default: 1h)")
    token.add_argument("--algorithm", choices=("HS256", "HS384", "HS512"), default="HS256",
                       help="HMAC algorithm; one the gateway's jwt_algorithms accepts (default: HS256)")
    token.add_argument("--audience", help="'aud' claim (default: the configured jwt_audience)")
    token.add_argument("--issuer", help="'iss' claim (default: the configured jwt_issuer)")
    token.add_argument("--secret", help="HMAC secret (default: the configured jwt_secret)")
    token.add_argument("--config", metavar="FILE", help="TOML file to read jwt_secret and friends from")
    commands.add_parser("loadgen", help="run the bundled load generator (see 'wirehub loadgen --help')",
                        add_help=False)
    return parser


def _token(args: argparse.Namespace) -> int:
    from .auth import mint_token
    from .protocol.patterns import PatternError, compile_pattern

    try:
        cfg = config_module.load(args.config)
    except ConfigError as exc:
        print(f"wirehub: {exc}", file=sys.stderr)
        return 2
    secret = args.secret or cfg.jwt_secret
    if not secret:
        print("wirehub: no secret: pass --secret, or set jwt_secret (--config or WIREHUB_JWT_SECRET)",
              file=sys.stderr)
        return 2
    try:
        for pattern in (*args.subscribe, *args.publish):
            compile_pattern(pattern)
    except PatternError as exc:
        print(f"wirehub: {exc}", file=sys.stderr)
        return 2
    claims = {}
    if args.audience or cfg.jwt_audience:
        claims["aud"] = args.audience or cfg.jwt_audience
    if args.issuer or cfg.jwt_issuer:
        claims["iss"] = args.issuer or cfg.jwt_issuer
    print(mint_token(secret, sub=args.sub, subscribe=args.subscribe, publish=args.publish,
                     permissions=args.permission, ttl_s=args.ttl, algorithm=args.algorithm, **claims))
    return 0


class _Shutdown:
    """SIGTERM and SIGINT: stop gracefully, and exit at ``shutdown_timeout_s`` whatever happens.

    The handlers are ``signal.signal`` ones, not ``loop.add_signal_handler``
    callbacks: Python runs them in the main thread between two bytecodes of
    whatever it is doing, so a loop stuck in one long callback still hears
    the signal, and the deadline is kept by a thread that needs no loop. The
    graceful stop gets 80 % of the timeout; a second signal exits at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.requested = asyncio.Event()
        self.graceful_timeout_s = 0.8 * timeout_s
        self._loop = loop
        self._timeout_s = timeout_s
        self._done = threading.Event()
        self._watchdog: threading.Thread | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._watchdog is not None:
            _exit_now(f"wirehub: {name} again: exiting without waiting for clients\n")
        self._watchdog = threading.Thread(target=self._keep_deadline, args=(name,),
                                          name="shutdown-deadline", daemon=True)
        self._watchdog.start()
        self._loop.call_soon_threadsafe(self.requested.set)

    def _keep_deadline(self, name: str) -> None:
        if not self._done.wait(self._timeout_s):
            _exit_now(f"wirehub: not stopped {self._timeout_s:g} s after {name} (the event loop is "
                      f"saturated or stuck): exiting without a graceful close\n")

    def finished(self) -> None:
        """The graceful stop is over: the deadline no longer applies."""
        self._done.set()


def _exit_now(message: str) -> None:
    os.write(2, message.encode())
    os._exit(1)


def _listening(cfg: Config, port: int, how: str) -> str:
    scheme = "wss" if cfg.tls_cert else "ws"
    return f"wirehub {__version__} listening on {scheme}://{cfg.host}:{port}{cfg.ws_path} ({how})"


async def _serve(cfg: Config, worker: int | None) -> None:
    from .gateway import Gateway

    open_files = openfiles.lift()  # before the gateway sizes its connection limit on it
    gateway = Gateway(cfg)
    await gateway.start()
    garbage.tune()  # this process is the gateway's: see wirehub.garbage
    shutdown = _Shutdown(asyncio.get_running_loop(), cfg.shutdown_timeout_s)
    if worker is not None:  # the supervisor says it all once, for every worker
        workers.report_ready()
        await _run_until_stopped(gateway, shutdown, quiet=True)
        return
    print(_listening(cfg, gateway.port, f"{gateway.impl.name} hot path"), file=sys.stderr, flush=True)
    if not cfg.auth_enabled:
        print("wirehub: WARNING: no jwt_secret, jwt_public_key or jwks configured: the gateway is OPEN, "
              "any client may subscribe and publish anywhere (docs/security.md)", file=sys.stderr, flush=True)
    elif cfg.allow_anonymous:
        print("wirehub: anonymous connections allowed (default_subscribe/default_publish only)",
              file=sys.stderr, flush=True)
    if gateway.http_api is not None:
        print(f"wirehub: {gateway.http_api.describe()}", file=sys.stderr, flush=True)
    if gateway.files is not None:
        where = (f"downloads at http{'s' if cfg.tls_cert else ''}://{cfg.api_host}:{gateway.http_api.port}"
                 f"/files/<id>" if gateway.http_api is not None else "no downloads (set --api-port)")
        print(f"wirehub: file uploads into {cfg.file_dir} (tokens need files:upload); {where}",
              file=sys.stderr, flush=True)
    if gateway.admission.capped_by_open_files:
        print(f"wirehub: at most {gateway.admission.max_connections:,} connections: the open-file limit is "
              f"{open_files:,} (ulimit -n); past it clients are answered 503", file=sys.stderr, flush=True)
    await _run_until_stopped(gateway, shutdown)


async def _run_until_stopped(gateway: Any, shutdown: _Shutdown, quiet: bool = False) -> None:
    await shutdown.requested.wait()
    if not quiet:
        print("wirehub: shutting down", file=sys.stderr, flush=True)
    await gateway.stop(timeout_s=shutdown.graceful_timeout_s)
    shutdown.finished()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        from .loadgen.cli import main as loadgen_main

        return loadgen_main(argv[1:], prog="wirehub loadgen")
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    lists = config_module.list_fields()
    # A --channel value holds commas of its own: config.parse_channel splits it.
    overrides = {name: config_module.split_list(value) if name in lists and name != "channels" else value
                 for name in config_module.field_names()
                 if (value := getattr(args, name)) is not None}
    try:
        cfg = config_module.load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"wirehub: {exc}", file=sys.stderr)
        return 2
    log.configure(cfg.log_level, cfg.log_format)
    from . import _speedups

    fallback = _speedups.implementation().fallback
    if fallback and not cfg.pure_hot_path:
        print(f"wirehub: the compiled hot path did not import: {fallback}\n"
              f"wirehub: reinstall wirehub (pip install .) to build it, or start on the pure-Python "
              f"twins, several times slower, with --pure-hot-path", file=sys.stderr)
        return 2
    worker = workers.worker_index()
    if cfg.workers > 1 and worker is None:
        supervisor = workers.Supervisor(argv[1:], cfg.workers, cfg.shutdown_timeout_s)
        from .broker.redis import redacted

        return supervisor.run(_listening(cfg, cfg.port, f"{cfg.workers} workers, broker {redacted(cfg.broker)}"))
    if worker is not None:
        cfg = msgspec.structs.replace(cfg, reuse_port=True)
    import uvloop

    try:
        uvloop.run(_serve(cfg, worker))
    except ssl.SSLError as exc:
        print(f"wirehub: cannot use the TLS certificate or key: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename:  # a key or certificate file
            print(f"wirehub: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
        print(f"wirehub: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an unusable key
        print(f"wirehub: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:  # --broker names a Redis that does not answer
        print(f"wirehub: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
