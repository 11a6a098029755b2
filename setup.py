"""Build the Cython hot path.

Every ``.pyx`` under ``ext/`` becomes one extension module whose import name
mirrors its path (``ext/wirehub/_ext/tlv.pyx`` -> ``wirehub._ext.tlv``), so
``.pxd`` cimports between modules resolve the same way imports do.

Build switches (environment variables, since PEP 517 front ends do not pass
``setup.py`` flags through):

* ``WIREHUB_CYTHON_ANNOTATE=1`` writes the HTML annotation next to each source.
* ``WIREHUB_CYTHON_TRACE=1`` compiles with line tracing for coverage/profiling.
"""

from __future__ import annotations

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).parent
EXT_ROOT = ROOT / "ext"
# Cython translation and the C compiler run on every core: the build is about
# a minute on one, most of a fresh install's time.
BUILD_JOBS = os.cpu_count() or 1


def _extensions() -> list[Extension]:
    trace = os.environ.get("WIREHUB_CYTHON_TRACE") == "1"
    macros = [("CYTHON_TRACE_NOGIL", "1")] if trace else []
    extensions = []
    for pyx in sorted(EXT_ROOT.rglob("*.pyx")):
        module = ".".join(pyx.relative_to(EXT_ROOT).with_suffix("").parts)
        extensions.append(
            Extension(
                module,
                [str(pyx.relative_to(ROOT))],
                define_macros=macros,
                extra_compile_args=["-O3"],
                libraries=["z"],
            )
        )
    return cythonize(
        extensions,
        nthreads=BUILD_JOBS,
        include_path=[str(EXT_ROOT)],
        annotate=os.environ.get("WIREHUB_CYTHON_ANNOTATE") == "1",
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "linetrace": trace,
        },
    )


setup(
    # The load generator lives in tools/loadgen/ (runnable from a checkout with
    # `python -m tools.loadgen`) and installs as wirehub.loadgen.
    package_dir={"": "src", "wirehub.loadgen": "tools/loadgen"},
    packages=[
        "wirehub",
        "wirehub._ext",
        "wirehub._pure",
        "wirehub.broker",
        "wirehub.protocol",
        "wirehub.sources",
        "wirehub.static",
        "wirehub.loadgen",
    ],
    package_data={"wirehub": ["py.typed"], "wirehub.static": ["*.js", "*.html", "*.css", "package.json"]},
    ext_modules=_extensions(),
    options={"build_ext": {"parallel": BUILD_JOBS}},
)
