"""The dependency direction of docs/architecture.md, checked as a test.

Imports only point down: the protocol layer knows nothing of sockets or the
event loop, the compiled hot path imports no orchestration module, brokers
reach the hub only through callbacks.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "wirehub"
STDLIB = set(sys.stdlib_module_names)


def imports_of(path: Path) -> set[str]:
    """Absolute names a module imports (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    top = name.split(".")[0]
    return top in STDLIB or any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer, prefixes", [
    ("protocol", ("msgspec", "wirehub.protocol")),
    ("_pure", ("picows", "wirehub._pure")),
    ("broker", ("wirehub.broker", "wirehub.protocol", "msgspec", "redis", "hiredis")),  # a broker, its client library
    # A source sees the broker's interface types and, in a cluster, its leases; never a broker itself.
    ("sources", ("wirehub.sources", "wirehub.protocol", "wirehub.broker.base", "wirehub.broker.leases",
                 "msgspec", "docker", "requests")),
])
def test_layer_imports_point_down(layer, prefixes):
    for path in sorted((SRC / layer).glob("*.py")):
        bad = {n for n in imports_of(path) if not allowed(n, prefixes)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_protocol_layer_does_no_io():
    for path in (SRC / "protocol").glob("*.py"):
        assert not {"asyncio", "socket", "picows", "time"} & {n.split(".")[0] for n in imports_of(path)}, path


def test_compiled_modules_import_no_orchestration():
    pattern = re.compile(r"^\s*(?:from\s+(\S+)\s+c?import|c?import\s+(\S+))", re.M)
    for path in sorted((ROOT / "ext").rglob("*.p[yx][xd]")):
        for match in pattern.finditer(path.read_text()):
            name = match.group(1) or match.group(2)
            assert allowed(name, ("wirehub._ext", "picows", "libc", "cpython", "posix", "cython")), \
                f"{path.relative_to(ROOT)} imports {name}"


def test_every_compiled_module_has_a_pure_twin():
    compiled = {p.stem for p in (ROOT / "ext" / "wirehub" / "_ext").glob("*.pyx")}
    pure = {p.stem for p in (SRC / "_pure").glob("*.py")} - {"__init__"}
    assert compiled - {"loadgen_client"} <= pure


def test_every_package_is_installed():
    """A package missing from setup.py's list works in an editable install and
    is absent from a real one (as CI installs it)."""
    listed = set(re.findall(r'"(wirehub(?:\.\w+)*)"', (ROOT / "setup.py").read_text()))
    found = {".".join(p.parent.relative_to(SRC.parent).parts) for p in SRC.rglob("__init__.py")}
    assert found <= listed, f"add to setup.py packages: {sorted(found - listed)}"
