"""``wirehub``: the command line, a thin layer over ``wirehub.Gateway``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import typing

from . import config as config_module
from . import log
from .__version__ import __version__
from .config import Config, ConfigError

SERVE_EXAMPLES = """\
examples:
  wirehub serve                                  # 127.0.0.1:8080, endpoint /ws
  wirehub serve --host 0.0.0.0 --port 9000
  wirehub serve --config wirehub.toml            # keys are the option names, e.g. port = 9000
  WIREHUB_MAX_PAYLOAD_BYTES=65536 wirehub serve  # every option has a WIREHUB_* variable
  wirehub serve --echo --log-level info          # enable the /echo diagnostics endpoint

precedence: defaults < --config file < WIREHUB_* environment < flags
"""


# Short spellings the docs use, next to the generated ``--<field-name>`` flags.
FLAG_ALIASES = {"auth_timeout_s": "--auth-timeout"}


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
            parser.add_argument(*flags, dest=name, action="append", default=None, metavar="VALUE",
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
        "serve", help="run the gateway", description="Run the gateway with the embedded in-memory broker.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--config", metavar="FILE", help="TOML file with option values")
    _add_config_options(serve)
    commands.add_parser("loadgen", help="run the bundled load generator (see 'wirehub loadgen --help')",
                        add_help=False)
    return parser


async def _serve(cfg: Config) -> None:
    from .gateway import Gateway

    gateway = Gateway(cfg)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"wirehub {__version__} listening on ws://{cfg.host}:{gateway.port}{cfg.ws_path}"
          f" ({gateway.impl.name} hot path)", file=sys.stderr, flush=True)
    await stop.wait()
    print("wirehub: shutting down", file=sys.stderr, flush=True)
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:
        from .loadgen.cli import main as loadgen_main

        return loadgen_main(argv[1:], prog="wirehub loadgen")
    args = build_parser().parse_args(argv)
    lists = config_module.list_fields()
    overrides = {name: config_module.split_list(value) if name in lists else value
                 for name in config_module.field_names()
                 if (value := getattr(args, name)) is not None}
    try:
        cfg = config_module.load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"wirehub: {exc}", file=sys.stderr)
        return 2
    log.configure(cfg.log_level, cfg.log_format)
    import uvloop

    try:
        uvloop.run(_serve(cfg))
    except OSError as exc:
        print(f"wirehub: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
