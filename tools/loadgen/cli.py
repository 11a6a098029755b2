"""Command line: ``python -m tools.loadgen MODE ...`` (or ``wirehub loadgen MODE ...``).

``main`` and ``build_parser`` are what ``wirehub loadgen`` delegates to.
Exit status: 0 when errors <= ``--max-errors``, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import CODECS, PROTOCOLS, Config
from .handshake import Target
from .payload import min_size
from .report import format_text
from .runner import Runner

EXAMPLES = """\
examples:
  # 100 connections, 4 round trips in flight each, against a wirehub server (ping/pong)
  %(prog)s echo --connections 100 --inflight 4
  # the same against any echo server, 1 KiB binary frames, 2 client processes
  %(prog)s echo --protocol raw --binary --size 1024 --url ws://127.0.0.1:9001/ --procs 2
  # echo at a fixed 20k round trips/s; latency counts from the intended send time
  %(prog)s echo --connections 100 --rate 20000
  # 1 publisher -> 1000 subscribers on one channel, 32 publications in flight
  %(prog)s fanout --publishers 1 --subscribers 1000 --window 32 --procs 2
  # 10 publishers, 1000 subscribers over 10 channels, TLV (binary) codec, 5k publications/s
  %(prog)s fanout --publishers 10 --subscribers 1000 --channels 10 --codec tlv --rate 5000
  # the same measurement against a plain broadcast server (every message to every connection)
  %(prog)s fanout --protocol raw --url ws://127.0.0.1:9002/ --subscribers 1000
  # open 10,000 connections 500 at a time, hold them 10 s (measure server memory meanwhile)
  %(prog)s connect --connections 10000 --concurrency 500 --hold 10
  # machine-readable result; non-zero exit if anything at all went wrong
  %(prog)s fanout --subscribers 100 --json --max-errors 0
"""


def _examples(mode: str) -> str:
    """The EXAMPLES entries of one mode (comment line + command)."""
    lines = EXAMPLES.splitlines()
    picked = [line for i, line in enumerate(lines[1:], 1)
              if f"%(prog)s {mode} " in line or (i + 1 < len(lines)
                                               and f"%(prog)s {mode} " in lines[i + 1])]
    return "examples:\n" + "\n".join(picked).replace("%(prog)s " + mode, "%(prog)s") + "\n"


def build_parser(prog: str = "python -m tools.loadgen") -> argparse.ArgumentParser:
    """The loadgen's argument parser; ``wirehub loadgen`` passes its own ``prog``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="WebSocket load generator for wirehub and plain echo/broadcast servers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("target")
    g.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="server URL (default: %(default)s)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="wirehub",
                   help="wirehub: JSON/TLV protocol (docs/protocol.md); raw: plain echo or "
                        "broadcast server, payload is the message (default: %(default)s)")
    g.add_argument("--codec", choices=CODECS, default="json",
                   help="wirehub codec: JSON text frames or TLV binary frames")
    g.add_argument("--binary", action="store_true", help="raw protocol: send binary frames")
    g = common.add_argument_group("load")
    g.add_argument("--size", type=int, default=64,
                   help="bytes the server forwards untouched: wirehub data/id value, raw frame "
                        "(min 40; default: %(default)s)")
    g.add_argument("--rate", type=float, default=0.0,
                   help="fixed total send rate in messages/s; latency is measured from each "
                        "message's intended send time (default: as fast as the window allows)")
    g.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    g.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    g.add_argument("--drain", type=float, default=3.0,
                   help="seconds to wait for messages in flight after sending stops")
    g = common.add_argument_group("client")
    g.add_argument("--procs", type=int, default=1, help="client worker processes")
    g.add_argument("--concurrency", type=int, default=200, help="handshakes in progress at once")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds per handshake")
    g.add_argument("--server-pid", type=int, default=0, metavar="PID",
                   help="a server process on this machine: report its CPU use over the "
                        "measured window (connect: the handshakes) and the work done per "
                        "server CPU-second")
    g = common.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    g.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    g.add_argument("--max-errors", type=int, default=0,
                   help="exit 1 when errors (failed/closed connections, malformed frames, "
                        "error replies, missing/duplicate/out-of-order messages) exceed this")

    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    echo = sub.add_parser("echo", parents=[common], epilog=_examples("echo"),
                          formatter_class=argparse.RawDescriptionHelpFormatter, help="round trips on N connections",
                          description="N connections send K messages each and wait for them to "
                                      "come back (wirehub: ping/pong; raw: any echo server).")
    echo.add_argument("--connections", type=int, default=100, help="connections (default 100)")
    echo.add_argument("--inflight", type=int, default=1, help="round trips in flight per connection")
    fan = sub.add_parser("fanout", parents=[common], epilog=_examples("fanout"),
                          formatter_class=argparse.RawDescriptionHelpFormatter, help="P publishers -> N subscribers",
                         description="P publishers publish on C channels; N subscribers (one "
                                     "channel each) count deliveries and check offsets. With "
                                     "--protocol raw, every connection gets every message.")
    fan.add_argument("--publishers", type=int, default=1, help="publishing connections (default 1)")
    fan.add_argument("--subscribers", type=int, default=100,
                     help="subscribing connections, spread over the channels (default 100)")
    fan.add_argument("--channels", type=int, default=1, help="channels (default 1)")
    fan.add_argument("--window", type=int, default=32,
                     help="publications in flight per publisher, until acked (wirehub: "
                          "'published' reply; raw: own message received back)")
    fan.add_argument("--channel-prefix", help="channel name prefix (default: random per run)")
    conn = sub.add_parser("connect", parents=[common], epilog=_examples("connect"),
                          formatter_class=argparse.RawDescriptionHelpFormatter, help="handshake rate and idle connections",
                          description="Open N connections at --concurrency, then hold them.")
    conn.add_argument("--connections", type=int, default=1000, help="connections to open (default 1000)")
    conn.add_argument("--hold", type=float, default=0.0, help="seconds to keep them open")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Validate the parsed arguments and build the run's ``Config``."""
    fields = dict(mode=args.mode, url=args.url, protocol=args.protocol, codec=args.codec,
                  binary=args.binary, size=args.size, rate=args.rate, duration_s=args.duration,
                  warmup_s=args.warmup, drain_s=args.drain, procs=args.procs,
                  concurrency=args.concurrency, connect_timeout_s=args.connect_timeout,
                  max_errors=args.max_errors, server_pid=args.server_pid)
    if args.mode in ("echo", "connect"):
        fields["connections"] = args.connections
    if args.mode == "echo":
        fields["inflight"] = args.inflight
    if args.mode == "connect":
        fields["hold_s"] = args.hold
    if args.mode == "fanout":
        fields.update(publishers=args.publishers, subscribers=args.subscribers,
                      channels=args.channels, window=args.window)
        if args.channel_prefix:
            fields["channel_prefix"] = args.channel_prefix
    cfg = Config(**fields)
    problems = []
    try:
        Target.from_url(cfg.url)
    except ValueError as exc:
        problems.append(f"--url: {exc}")
    if cfg.size < min_size(cfg.protocol, cfg.codec):
        problems.append(f"--size must be >= {min_size(cfg.protocol, cfg.codec)}")
    if cfg.server_pid and not os.path.exists(f"/proc/{cfg.server_pid}/stat"):
        problems.append(f"--server-pid {cfg.server_pid}: no such process (or no /proc)")
    if cfg.procs < 1 or cfg.concurrency < 1:
        problems.append("--procs and --concurrency must be >= 1")
    if cfg.mode == "fanout":
        if min(cfg.publishers, cfg.subscribers, cfg.channels, cfg.window) < 1:
            problems.append("--publishers, --subscribers, --channels and --window must be >= 1")
        if cfg.protocol == "raw" and cfg.channels != 1:
            problems.append("--protocol raw has no channels: use --channels 1")
    elif cfg.connections < 1 or cfg.inflight < 1:
        problems.append("--connections and --inflight must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def main(argv: list[str] | None = None, prog: str = "python -m tools.loadgen") -> int:
    """Run one load test; return the exit status (``prog`` names it in --help)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    progress = None if args.no_progress or not sys.stderr.isatty() else sys.stderr
    try:
        result = Runner(cfg, progress).run()
    except KeyboardInterrupt:
        return 130
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_text(result))
    return 0 if result["ok"] else 1
