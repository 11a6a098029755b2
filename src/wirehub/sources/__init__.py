"""Producers the gateway runs itself, started when their channels gain viewers.

``base`` holds the interfaces between the hub and a source and the
thread-to-loop ``Handoff``; ``metrics`` is ``$sys:metrics``, the gateway's
live metrics (always installed); ``docker_stream`` decodes the engine's log wire
formats (no I/O); ``docker_engine``, ``docker_logs``, ``docker_events`` and
``docker`` are the Docker sources (``wirehub serve --docker``).
"""
