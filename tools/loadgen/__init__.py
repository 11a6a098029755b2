"""wirehub load generator (installed as wirehub.loadgen).

Run ``python -m tools.loadgen --help`` for the modes (echo, fanout, connect).
Module map: ``cli`` (arguments) → ``runner`` (worker processes, phases,
progress) → ``worker`` (connections of one process) → ``_speedups`` (the
Cython listeners from ``wirehub._ext.loadgen_client`` or their pure-Python
twin ``_pure``); ``payload`` builds frames, ``histogram`` merges latencies,
``report`` aggregates and prints.
"""
