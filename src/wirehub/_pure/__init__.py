"""Readable pure-Python references for the Cython modules in ``ext/``.

Each module here has the same API as its compiled twin in ``wirehub._ext``;
the unit tests run one suite against both. ``WIREHUB_NO_EXTENSIONS=1`` makes
the gateway run on these.
"""
