"""Run Autobahn|Testsuite against wirehub: the server, or the Python client.

By default this runs the fuzzingclient: it starts ``wirehub serve --echo`` on
a free port and runs every case (``*``: 517 cases, 12.* and 13.*
permessage-deflate included) against ``ws://127.0.0.1:PORT/echo``.
``--server picows`` runs the bundled picows echo
(``tools/autobahn/picows_echo.py``, the baseline) instead, and ``--url``
targets a server that is already running.

``--client`` turns it around: ``wstest -m fuzzingserver`` listens on a free
port and ``tools/autobahn/client_echo.py``, an echo agent on
``wirehub.Client``'s wire layer (``wirehub.client_wire``), connects to it
for every case; the report is ``reports/clients/``. ``--client pure`` runs
the agent on the pure-Python hot path.

Autobahn|Testsuite runs on Python 2.7 only. The first run builds a pinned
virtualenv in ``.cache/autobahn-venv`` (``requirements-py2.txt``, about a
minute); later runs reuse it. Without a Python 2.7 the runner says what to
install and exits with 77 ("skipped"), never silently.

Exit status: 0 all cases OK/NON-STRICT/INFORMATIONAL (and, without
``--strict``, UNIMPLEMENTED); 1 some case FAILED or did not run (or, with
``--strict``, was UNIMPLEMENTED); 2 the run itself broke (server did not
start, wstest crashed); 77 Python 2.7 is missing.

Examples::

    python tools/autobahn/run.py --server picows
    python tools/autobahn/run.py --cases '1.*,2.*'
    python tools/autobahn/run.py --quick --strict      # CI: 373 cases, ~2 min
    python tools/autobahn/run.py --url ws://127.0.0.1:9001/ --agent websockets
    python tools/autobahn/run.py --write-summary docs/conformance.md
    python tools/autobahn/run.py --client --strict     # the Python client, every case
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".cache"
VENV = CACHE / "autobahn-venv"
BOOTSTRAP = CACHE / "autobahn-bootstrap"
REQUIREMENTS = HERE / "requirements-py2.txt"
# virtualenv 20.21.x is the last release that creates Python 2.7 environments;
# it runs on our Python 3 and seeds the 2.7 venv from wheels it embeds.
BOOTSTRAP_PINS = [
    "virtualenv==20.21.1",
    "distlib==0.4.4",
    "filelock==3.32.7",
    "platformdirs==3.11.0",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BROKEN = 2
EXIT_SKIPPED = 77  # the automake/meson convention for "skipped"

# The largest message the suite sends (9.1.6, 9.2.6).
AUTOBAHN_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# --quick keeps, of 12.* and 13.*, the cases x.1-x.5 (16 B to 4 KiB messages)
# and x.11 (8 KiB in 256-byte frames): every data set and every negotiation
# variant, without the 8-128 KiB messages that take 95% of the time.
QUICK_EXCLUDE = ",".join(
    f"{group}.*.{case}" for group in (12, 13) for case in [*range(6, 11), *range(12, 19)]
)

BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
GROUPS = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved Bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 Handling",
    "7": "Close Handling",
    "9": "Limits/Performance",
    "10": "Misc",
    "12": "permessage-deflate (payloads)",
    "13": "permessage-deflate (parameters)",
}
SUMMARY_START = "<!-- autobahn-summary:start -->"
SUMMARY_END = "<!-- autobahn-summary:end -->"
CLIENT_SUMMARY_START = "<!-- autobahn-client-summary:start -->"
CLIENT_SUMMARY_END = "<!-- autobahn-client-summary:end -->"
# After the agent's last connection (/updateReports), wstest writes the
# reports and exits; past this it is stuck and is stopped.
REPORTS_TIMEOUT_S = 120

PYTHON2_MISSING = """\
Autobahn|Testsuite needs Python 2.7 and none was found ({tried}).
Install one and run again, for example:

    curl -fsSL https://pyenv.run | bash    # if pyenv is not installed yet
    pyenv install 2.7.18

then pass it with --python2 ~/.pyenv/versions/2.7.18/bin/python2.7
or export WIREHUB_PYTHON2=~/.pyenv/versions/2.7.18/bin/python2.7.
(It also needs a C compiler for wsaccel/ujson.) Skipping: exit status 77."""


class RunnerError(Exception):
    """The run itself broke (exit 2), as opposed to a case failing."""


def log(msg: str) -> None:
    print(f"[autobahn] {msg}", file=sys.stderr, flush=True)


# --- Python 2.7 and the cached virtualenv ---------------------------------


def find_python2(explicit: str | None) -> tuple[str | None, list[str]]:
    """Return (path to a working python2.7 or None, the candidates tried)."""
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    elif os.environ.get("WIREHUB_PYTHON2"):
        candidates.append(os.environ["WIREHUB_PYTHON2"])
    else:
        for name in ("python2.7", "python2"):
            found = shutil.which(name)
            if found:
                candidates.append(found)
        pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
        candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "2.7*", "bin", "python2.7")))
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "2.7":
            return candidate, candidates
    return None, candidates or ["python2.7 on PATH", "~/.pyenv/versions/2.7*"]


def _stamp(python2: str) -> str:
    text = REQUIREMENTS.read_text() + "\n".join(BOOTSTRAP_PINS) + os.path.realpath(python2)
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_venv(python2: str, venv: Path) -> Path:
    """Build the py2 venv unless it exists for these pins; return its wstest.

    Runners started side by side (``.ci/run``'s shards) take turns through a
    lock file: otherwise each would delete and rebuild the venv the other is
    building or already running from.
    """
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_venv_locked(python2, venv)


def _ensure_venv_locked(python2: str, venv: Path) -> Path:
    wstest = venv / "bin" / "wstest"
    stamp_file = venv / ".wirehub-stamp"
    stamp = _stamp(python2)
    if wstest.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return wstest

    log(f"building {venv} with {python2} (once; about a minute)")
    CACHE.mkdir(exist_ok=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_PYTHON_VERSION_WARNING="1")
    bootstrap_python = BOOTSTRAP / "bin" / "python"
    if not (BOOTSTRAP / ".done").exists():
        shutil.rmtree(BOOTSTRAP, ignore_errors=True)
        _check_call([sys.executable, "-m", "venv", str(BOOTSTRAP)], env)
        _check_call(
            [str(bootstrap_python), "-m", "pip", "install", "-q", "--no-deps", *BOOTSTRAP_PINS], env
        )
        (BOOTSTRAP / ".done").write_text("\n".join(BOOTSTRAP_PINS))
    shutil.rmtree(venv, ignore_errors=True)
    _check_call(
        [str(bootstrap_python), "-m", "virtualenv", "-q", "--no-download", "-p", python2, str(venv)],
        env,
    )
    _check_call(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], env
    )
    _check_call([str(venv / "bin" / "python"), "-m", "pip", "check"], env)
    stamp_file.write_text(stamp)
    return wstest


def _check_call(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RunnerError(f"command failed ({proc.returncode}): {' '.join(cmd)}")


# --- the server under test --------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, port: int) -> tuple[list[str], str, str]:
    """Return (argv, url, agent name) for a server this runner starts itself."""
    if kind == "wirehub":
        argv = [
            sys.executable,
            "-c",
            "import sys; from wirehub.cli import main; sys.exit(main())",
            "serve",
            "--echo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # Cases 9.1.6/9.2.6 send 16 MiB messages; the default limit is 1 MiB.
            "--max-payload-bytes",
            str(AUTOBAHN_MAX_MESSAGE_BYTES),
            # ... and the outbound buffer must hold such a message.
            "--high-water-bytes",
            str(4 * AUTOBAHN_MAX_MESSAGE_BYTES),
        ]
        return argv, f"ws://127.0.0.1:{port}/echo", "wirehub"
    echo = [sys.executable, str(HERE / "picows_echo.py"), "--port", str(port)]
    if kind == "picows":
        return echo, f"ws://127.0.0.1:{port}/", "picows-echo"
    if kind == "picows-deflate":
        return echo + ["--deflate"], f"ws://127.0.0.1:{port}/", "picows-echo+wirehub-deflate"
    if kind == "picows-deflate-pure":
        return (
            echo + ["--deflate", "--pure"],
            f"ws://127.0.0.1:{port}/",
            "picows-echo+wirehub-pure-deflate",
        )
    raise ValueError(kind)


def wait_for_port(proc: subprocess.Popen, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunnerError(f"the server exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RunnerError(f"the server did not listen on port {port} within {timeout_s:.0f}s")


@contextlib.contextmanager
def started_server(kind: str, log_path: Path):
    port = free_port()
    argv, url, agent = server_command(kind, port)
    shown = ["wirehub", *argv[3:]] if argv[1] == "-c" else argv[1:]
    log(f"starting {' '.join(shown)}")
    with open(log_path, "wb") as server_log:
        proc = subprocess.Popen(argv, stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            try:
                wait_for_port(proc, port, 30)
            except RunnerError as exc:
                server_log.flush()
                tail = log_path.read_text(errors="replace")[-2000:].strip()
                raise RunnerError(f"{exc}; its output ({log_path}):\n{tail}") from None
            yield url, agent, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if proc.returncode not in (0, -15, None):
        log(f"the server exited with status {proc.returncode}: see {log_path}")


# --- wstest -------------------------------------------------------------------


def write_spec(workdir: Path, url: str, agent: str, cases: list[str], exclude: list[str]) -> Path:
    spec = {
        # failByDrop=false: a server that drops the TCP connection where the
        # RFC allows it is not counted as failing (the suite's own default).
        "options": {"failByDrop": False},
        "outdir": str(workdir / "servers"),
        "servers": [{"agent": agent, "url": url}],
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    path = workdir / "fuzzingclient.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def write_server_spec(workdir: Path, url: str, cases: list[str], exclude: list[str]) -> Path:
    """The fuzzingserver's spec: listen on ``url``, reports in ``clients/``."""
    spec = {
        "url": url,
        "options": {"failByDrop": False},
        "outdir": str(workdir / "clients"),
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    path = workdir / "fuzzingserver.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def run_wstest(wstest: Path, spec: Path, workdir: Path, progress: bool, mode: str = "fuzzingclient",
               agent_cmd: list[str] | None = None) -> tuple[int, list[str]]:
    """Run wstest; show one progress line; return (status, cases that could not connect).

    With ``agent_cmd`` (the fuzzingserver), that client is started once
    wstest runs, its output in ``client_echo.log``; wstest is stopped if it
    has not exited ``REPORTS_TIMEOUT_S`` after the agent, and an agent that
    failed raises ``RunnerError``.
    """
    python = wstest.parent / "python"
    cmd = [str(python), "-u", str(wstest), "-m", mode, "-s", str(spec)]
    if mode == "fuzzingserver":
        cmd += ["--webport", "0"]  # no embedded web server (its port 8080 could be taken)
    log_path = workdir / ("wstest.log" if mode == "fuzzingclient" else f"wstest-{mode}.log")
    total = 0
    done = 0
    current = ""
    start = time.monotonic()
    connect_failures: list[str] = []
    tty = sys.stderr.isatty()
    last_print = 0.0

    def show(final: bool = False) -> None:
        nonlocal last_print
        if not progress:
            return
        now = time.monotonic()
        if not final and not tty and now - last_print < 15:
            return
        last_print = now
        line = f"[autobahn] {done}/{total or '?'} cases, {now - start:.0f}s, now {current}"
        if tty:
            sys.stderr.write("\r" + line.ljust(78) + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    with open(log_path, "w", buffering=1) as out:  # line-buffered: tail -f works
        proc = subprocess.Popen(
            cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        ticker_stop = threading.Event()

        def ticker() -> None:  # keep the line alive during long cases (9.*)
            while not ticker_stop.wait(5 if tty else 15):
                show()

        threading.Thread(target=ticker, daemon=True).start()
        agent = None
        if agent_cmd:
            agent_log = open(workdir / "client_echo.log", "wb")  # noqa: SIM115 - closed below
            agent = subprocess.Popen(agent_cmd, stdout=agent_log, stderr=subprocess.STDOUT, cwd=ROOT)

            def reaper() -> None:  # wstest ends after the agent's /updateReports
                agent.wait()
                try:
                    proc.wait(REPORTS_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.terminate()

            threading.Thread(target=reaper, daemon=True).start()
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if m := re.match(r"Ok, will run (\d+) test cases", line):
                total = int(m.group(1))
            elif m := re.match(r"Running test case ID (\S+)", line):
                done += 1
                current = m.group(1)
                show()
            elif line.startswith("Connection to ") and " failed " in line:
                connect_failures.append(current or "(first case)")
        status = proc.wait()
        ticker_stop.set()
    show(final=True)
    if agent is not None:
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:  # wstest died under it
            agent.kill()
            agent.wait()
        agent_log.close()
        if agent.returncode != 0:
            tail = (workdir / "client_echo.log").read_text(errors="replace")[-2000:].strip()
            raise RunnerError(f"the client echo agent exited with {agent.returncode}: {tail}")
    return status, connect_failures


# --- results --------------------------------------------------------------------


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def load_results(outdir: Path, agent: str) -> list[dict]:
    """Read index.json and each case's report; return one dict per case, sorted."""
    index_path = outdir / "index.json"
    if not index_path.exists():
        raise RunnerError(f"{index_path} was not written: see wstest.log beside it")
    index = json.loads(index_path.read_text())
    if agent not in index:
        raise RunnerError(f"agent {agent!r} not in {index_path} (found {sorted(index)})")
    results = []
    for case_id, entry in index[agent].items():
        description = ""
        report = outdir / entry.get("reportfile", "")
        if entry.get("reportfile") and report.exists():
            with contextlib.suppress(ValueError):
                description = json.loads(report.read_text()).get("description", "")
        results.append(
            {
                "id": case_id,
                "behavior": entry.get("behavior", "?"),
                "behavior_close": entry.get("behaviorClose", "?"),
                "duration_ms": entry.get("duration", 0),
                "remote_close_code": entry.get("remoteCloseCode"),
                "description": _plain(description),
            }
        )
    results.sort(key=lambda r: case_key(r["id"]))
    return results


def _plain(html: str) -> str:
    text = re.sub(r"<[^>]+>", " ", html)
    return re.sub(r"\s+", " ", text).strip()


def summarize(results: list[dict]) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    totals: collections.Counter = collections.Counter()
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        totals[r["behavior"]] += 1
        groups[r["id"].split(".")[0]][r["behavior"]] += 1
    return totals, groups


def format_table(totals, groups) -> str:
    behaviors = BEHAVIORS + sorted(set(totals) - set(BEHAVIORS))
    header = "| group | " + " | ".join(behaviors) + " | total |"
    rule = "|---|" + "---:|" * (len(behaviors) + 1)
    rows = [header, rule]
    for group in sorted(groups, key=int):
        counts = groups[group]
        name = f"{group}.* {GROUPS.get(group, '')}".strip()
        cells = [str(counts.get(b, 0) or "") for b in behaviors]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {sum(counts.values())} |")
    cells = [f"**{totals.get(b, 0)}**" for b in behaviors]
    rows.append("| **all** | " + " | ".join(cells) + f" | **{sum(totals.values())}** |")
    return "\n".join(rows)


def non_ok(results: list[dict]) -> list[dict]:
    return [r for r in results if r["behavior"] in ("FAILED", "UNIMPLEMENTED")]


def print_report(results, totals, groups, agent: str, elapsed_s: float, missing: list[str],
                 mode: str = "fuzzingclient") -> None:
    print(f"\nAutobahn|Testsuite {mode} against {agent}: {len(results)} cases in {elapsed_s:.0f}s")
    print(format_table(totals, groups))
    bad = non_ok(results)
    failed = [r for r in bad if r["behavior"] == "FAILED"]
    unimplemented = [r for r in bad if r["behavior"] == "UNIMPLEMENTED"]
    for title, rows in (("FAILED", failed), ("UNIMPLEMENTED", unimplemented)):
        if not rows:
            continue
        print(f"\n{title} ({len(rows)}):")
        for r in rows:
            print(f"  {r['id']:<10} close={r['behavior_close']:<13} {r['description'][:150]}")
    if missing:
        print(f"\nNOT RUN ({len(missing)}): {', '.join(missing[:40])}{' …' if len(missing) > 40 else ''}")


def _collapse(rows: list[dict]):
    """Yield (first id, last id, count, first row), merging UNIMPLEMENTED runs per subgroup."""
    i = 0
    while i < len(rows):
        r = rows[i]
        j = i + 1
        if r["behavior"] == "UNIMPLEMENTED":
            prefix = r["id"].rsplit(".", 1)[0]
            while (
                j < len(rows)
                and rows[j]["behavior"] == "UNIMPLEMENTED"
                and rows[j]["id"].rsplit(".", 1)[0] == prefix
            ):
                j += 1
        if j - i > 1:
            r = dict(r, description=_common_text([x["description"] for x in rows[i:j]]))
        yield r["id"], rows[j - 1]["id"], j - i, r
        i = j


def _common_text(texts: list[str]) -> str:
    """Describe many cases at once: their common start and end, '…' between."""
    prefix = os.path.commonprefix(texts)
    suffix = os.path.commonprefix([t[len(prefix):][::-1] for t in texts])[::-1]
    prefix = prefix[: prefix.rfind(" ") + 1] if " " in prefix else ""
    suffix = suffix[suffix.find(" ") :] if " " in suffix else ""
    return f"{prefix}…{suffix}".strip()


def write_summary(path: Path, results, totals, groups, agent: str, elapsed_s: float, command: str,
                  client: bool = False) -> None:
    """Write the generated block into ``path`` between the summary markers
    (the client's own markers for a ``--client`` run)."""
    start, end = (CLIENT_SUMMARY_START, CLIENT_SUMMARY_END) if client else (SUMMARY_START, SUMMARY_END)
    lines = [
        start,
        (f"Generated by `{command}` on {time.strftime('%Y-%m-%d', time.gmtime())}: "
         f"agent `{agent}`, {len(results)} cases, {elapsed_s:.0f} s on this project's 2-core machine."),
        "",
        format_table(totals, groups),
        "",
    ]
    shown = [r for r in results if r["behavior"] != "OK"]
    if shown:
        order = {b: i for i, b in enumerate(["FAILED", "UNIMPLEMENTED", "NON-STRICT", "INFORMATIONAL"])}
        lines += [
            (f"Cases not OK ({len(shown)}; FAILED first; a run of UNIMPLEMENTED cases "
             "in one subgroup is one row):"),
            "",
            "| case | behavior | close | description |",
            "|---|---|---|---|",
        ]
        shown.sort(key=lambda r: (order.get(r["behavior"], 9), case_key(r["id"])))
        for first, last, count, r in _collapse(shown):
            desc = r["description"].replace("|", "\\|")
            if len(desc) > 200:
                desc = desc[:200] + "…"
            ids = first if count == 1 else f"{first} – {last} ({count})"
            lines.append(f"| {ids} | {r['behavior']} | {r['behavior_close']} | {desc} |")
    else:
        lines.append("Every case is OK.")
    lines.append(end)
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "# Conformance\n\n") + block + "\n"
    path.write_text(text)
    log(f"wrote the summary into {path}")


# --- main -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run Autobahn|Testsuite against a WebSocket server (fuzzingclient) or, with "
        "--client, against wirehub's Python client (fuzzingserver).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 ok, 1 a case FAILED (or UNIMPLEMENTED with --strict), "
        "2 the run broke, 77 skipped (no Python 2.7).",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="target an already running server (e.g. ws://127.0.0.1:9001/)")
    target.add_argument(
        "--server",
        choices=["wirehub", "picows", "picows-deflate", "picows-deflate-pure"],
        default="wirehub",
        help="server to start on a free port (default: `wirehub serve --echo`; picows: "
        "tools/autobahn/picows_echo.py; picows-deflate[-pure]: the same with wirehub's "
        "permessage-deflate)",
    )
    target.add_argument(
        "--client",
        nargs="?",
        const="ext",
        choices=["ext", "pure"],
        help="test the Python client instead: wstest's fuzzingserver against "
        "tools/autobahn/client_echo.py (wirehub.client_wire) on the compiled (default) or pure hot path",
    )
    parser.add_argument(
        "--agent", help="agent name in the report (default from --server or --client, or 'server')"
    )
    parser.add_argument(
        "--cases", default="*", help="comma-separated globs over whole case ids, e.g. '1.*,12.*.1' (default '*')"
    )
    parser.add_argument("--exclude-cases", default="", help="comma-separated case globs to skip")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="skip the long permessage-deflate cases (12.*/13.* beyond 4 KiB messages, "
        "except x.11): 301 + 72 cases in about 2 min instead of 20-35",
    )
    parser.add_argument("--python2", help="Python 2.7 interpreter (default: $WIREHUB_PYTHON2, PATH, pyenv)")
    parser.add_argument("--reports", default=str(ROOT / "reports"), help="report directory (default reports/)")
    parser.add_argument(
        "--venv",
        default=os.environ.get("WIREHUB_AUTOBAHN_VENV", str(VENV)),
        help="where the pinned py2 virtualenv lives (default: $WIREHUB_AUTOBAHN_VENV or "
        ".cache/autobahn-venv); share one between clones to build it once",
    )
    parser.add_argument("--strict", action="store_true", help="UNIMPLEMENTED cases also fail the run")
    parser.add_argument("--write-summary", metavar="PATH", help="write the counts and non-OK cases into PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python2, tried = find_python2(args.python2)
    if python2 is None:
        print(PYTHON2_MISSING.format(tried=", ".join(tried)), file=sys.stderr)
        return EXIT_SKIPPED
    try:
        return _run(args, python2)
    except RunnerError as exc:
        log(f"error: {exc}")
        return EXIT_BROKEN


def _split(patterns: str) -> list[str]:
    """Split a comma list of case globs into the suite's patterns.

    The suite turns a pattern with ``*`` into a regex it only anchors at the
    start, so ``12.*.1`` would also pick 12.1.10 to 12.1.18. A trailing ``$``
    (which it passes through) makes every pattern a whole-id glob.
    """
    out = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if pattern:
            out.append(pattern + "$" if "*" in pattern and not pattern.endswith("$") else pattern)
    return out


def _run(args: argparse.Namespace, python2: str) -> int:
    wstest = ensure_venv(python2, Path(args.venv).resolve())
    reports = Path(args.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    outdir = reports / ("clients" if args.client else "servers")
    # Stale case files from an earlier run would be read as this run's.
    shutil.rmtree(outdir, ignore_errors=True)

    cases = _split(args.cases)
    exclude = _split(args.exclude_cases)
    if args.quick:
        exclude += _split(QUICK_EXCLUDE)
    start = time.monotonic()
    mode = "fuzzingserver" if args.client else "fuzzingclient"
    wstest_log = reports / ("wstest.log" if mode == "fuzzingclient" else f"wstest-{mode}.log")
    with contextlib.ExitStack() as stack:
        if args.client:
            url = f"ws://127.0.0.1:{free_port()}"
            agent = args.agent or ("wirehub-client" if args.client == "ext" else "wirehub-client-pure")
            log(f"fuzzingserver: cases {args.cases} on {url}, client {agent} (tools/autobahn/client_echo.py)")
            spec = write_server_spec(reports, url, cases, exclude)
            agent_cmd = [sys.executable, str(HERE / "client_echo.py"), url, "--agent", agent]
            if args.client == "pure":
                agent_cmd.append("--pure")
            status, connect_failures = run_wstest(wstest, spec, reports, not args.quiet, mode, agent_cmd)
        elif args.url:
            url, agent = args.url, args.agent or "server"
        else:
            url, agent, _ = stack.enter_context(started_server(args.server, reports / "server.log"))
            agent = args.agent or agent
        if not args.client:
            log(f"fuzzingclient: cases {args.cases} against {url}")
            spec = write_spec(reports, url, agent, cases, exclude)
            status, connect_failures = run_wstest(wstest, spec, reports, progress=not args.quiet)
    elapsed = time.monotonic() - start
    if status != 0:
        raise RunnerError(f"wstest exited with {status}: see {wstest_log}")

    results = load_results(outdir, agent)
    expected = _expected_cases(wstest_log)
    got = {r["id"] for r in results}
    missing = [c for c in expected if c not in got]
    totals, groups = summarize(results)
    print_report(results, totals, groups, agent, elapsed, missing, mode)
    if connect_failures:
        log(f"could not connect to {url} at case {connect_failures[0]}: the server died or refused")
    if args.write_summary:
        command = "python tools/autobahn/run.py " + " ".join(argv_for_doc(args))
        write_summary(Path(args.write_summary), results, totals, groups, agent, elapsed, command.strip(),
                      client=bool(args.client))
    log(f"HTML report: {outdir / 'index.html'}")

    if totals["FAILED"] or missing or connect_failures:
        return EXIT_FAILED
    if args.strict and totals["UNIMPLEMENTED"]:
        return EXIT_FAILED
    return EXIT_OK


def _expected_cases(wstest_log: Path) -> list[str]:
    for line in wstest_log.read_text().splitlines():
        if line.startswith("Cases = "):
            return re.findall(r"'([0-9.]+)'", line)
    return []


def argv_for_doc(args: argparse.Namespace) -> list[str]:
    out = []
    if args.client:
        out += ["--client"] if args.client == "ext" else ["--client", args.client]
    elif args.url:
        out += ["--url", args.url]
    elif args.server != "wirehub":
        out += ["--server", args.server]
    if args.cases != "*":
        out += ["--cases", f"'{args.cases}'"]
    if args.exclude_cases:
        out += ["--exclude-cases", f"'{args.exclude_cases}'"]
    if args.quick:
        out.append("--quick")
    if args.strict:
        out.append("--strict")
    out += ["--write-summary", args.write_summary]
    return out


if __name__ == "__main__":
    sys.exit(main())
