"""Everything ``wirehub serve --docker`` turns on, as one source per engine.

- ``logs:<container>`` (``docker_logs``): live container logs with ``tail``.
- ``runners`` and ``runner:<id>`` (``docker_events``): the containers, live.
- ``runner_stop`` and ``runner_delete``: application message types that
  stop or remove a container; they need the ``runners:delete`` permission
  and every attempt is written to the ``wirehub.audit`` log::

      → {"type": "runner_stop", "runner": "ci-runner-7", "timeout": 10, "id": 1}
      ← {"type": "runner_stopped", "runner": "3f2a…", "name": "ci-runner-7", "id": 1}

  With a runner label selector (``--runner-label``), only containers that
  carry the label can be stopped or removed; others are ``container_not_found``.

``DockerSources.install(gateway)`` registers all of it on a gateway (duck-typed:
this module does not import the gateway).
"""

from __future__ import annotations

import logging
from typing import Any

from ..protocol.errors import ContainerNotFound, InvalidField, WirehubError
from ..protocol.messages import Subscribe
from .base import Answer, Source, SourceHost, Subscriber
from .docker_engine import Engine
from .docker_events import DockerEventsSource
from .docker_logs import DockerLogsSource

PERMISSION = "runners:delete"
COMMANDS = frozenset({"runner_stop", "runner_delete"})
MAX_STOP_TIMEOUT_S = 600

audit = logging.getLogger("wirehub.audit")
# Audit records are kept whatever the gateway's log level (they propagate to its handlers).
audit.setLevel(logging.INFO)


def _runner_arg(msg: dict[str, Any]) -> str:
    runner = msg.get("runner")
    if not isinstance(runner, str) or not runner or len(runner) > 255:
        raise InvalidField("`runner` (a container id or name) is required", id=msg.get("id"))
    return runner


def _matches(labels: dict[str, str] | None, selector: str | None) -> bool:
    if selector is None:
        return True
    key, eq, value = selector.partition("=")
    labels = labels or {}
    return key in labels and (not eq or labels[key] == value)


class DockerSources:
    """The Docker channels and commands of one engine (a composite ``Source``).

    Args:
        engine: the Docker engine.
        runner_label: label selector (``key`` or ``key=value``) for runners
            and for the containers the commands may touch.
        ring_lines, max_streams: see ``DockerLogsSource``.
        logs_options, events_options: further keyword arguments for the two sources.
    """

    def __init__(self, engine: Engine, *, runner_label: str | None = None, ring_lines: int = 1000,
                 max_streams: int = 256, logs_options: dict[str, Any] | None = None,
                 events_options: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.runner_label = runner_label
        self.logs = DockerLogsSource(engine, ring_lines=ring_lines, max_streams=max_streams,
                                     **(logs_options or {}))
        self.runners = DockerEventsSource(engine, label=runner_label, **(events_options or {}))
        self._parts: tuple[Source, ...] = (self.logs, self.runners)

    @classmethod
    def from_config(cls, config: Any) -> DockerSources:
        return cls(Engine(config.docker_host), runner_label=config.runner_label,
                   ring_lines=config.docker_log_ring_lines, max_streams=config.docker_max_log_streams)

    def install(self, gateway: Any) -> None:
        """Add the channels, the ``runner_*`` commands and the metrics to ``gateway``."""
        # On a shared broker, one gateway of the cluster follows each container's logs.
        self.logs.leases = getattr(gateway.broker, "leases", None)
        gateway.add_source(self)
        # Log lines go into the channels' history too (unless a [[channels]]
        # pattern says otherwise): a viewer that reconnects with ``since``
        # gets every line it missed.
        gateway.policies.add_default("logs:**", history_size=self.logs.ring_lines,
                                     history_max_bytes=self.logs.ring_bytes)
        gateway.on("runner_stop", self.runner_stop, permission=PERMISSION)
        gateway.on("runner_delete", self.runner_delete, permission=PERMISSION)
        # The connection refuses a command without the permission before the
        # handler runs; this middleware sees the attempt first, for the audit log.
        gateway.use(self._audit_refusals)
        gateway.metrics.collectors.append(self.metrics_lines)

    # -- Source: each channel goes to the part that owns it ----------------------

    def _part(self, channel: str) -> Source:
        return self.logs if self.logs.owns(channel) else self.runners

    def owns(self, channel: str) -> bool:
        return self.logs.owns(channel) or self.runners.owns(channel)

    def shares(self, channel: str) -> bool:
        return self._part(channel).shares(channel)

    def bind(self, host: SourceHost) -> None:
        for part in self._parts:
            part.bind(host)

    async def start(self) -> None:
        for part in self._parts:
            await part.start()

    async def close(self) -> None:
        for part in self._parts:
            await part.close()
        self.engine.close()

    def subscribe(self, conn: Subscriber, channel: str, request: Subscribe, answer: Answer) -> bool:
        return self._part(channel).subscribe(conn, channel, request, answer)

    def cancel(self, conn: Subscriber, channel: str) -> bool:
        return self._part(channel).cancel(conn, channel)

    def forget(self, conn: Subscriber) -> None:
        for part in self._parts:
            part.forget(conn)

    def vacated(self, channel: str) -> None:
        self._part(channel).vacated(channel)

    def metrics_lines(self) -> list[str]:
        return [*self.logs.metrics_lines(),
                "# TYPE wirehub_docker_engine_up gauge",
                f"wirehub_docker_engine_up {int(self.runners.available)}",
                "# TYPE wirehub_docker_events_reconnects_total counter",
                f"wirehub_docker_events_reconnects_total {self.runners.reconnects}"]

    # -- commands -------------------------------------------------------------------

    async def runner_stop(self, conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        """``runner_stop``: stop a container (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        timeout = msg.get("timeout", 10)
        if type(timeout) is not int or not 0 <= timeout <= MAX_STOP_TIMEOUT_S:
            raise InvalidField(f"`timeout` must be an integer from 0 to {MAX_STOP_TIMEOUT_S}",
                               id=msg.get("id"))
        return await self._command(conn, msg, "runner_stop", "runner_stopped",
                                   lambda client, cid: client.stop(cid, timeout=timeout))

    async def runner_delete(self, conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        """``runner_delete``: remove a container (``force: true`` also kills a running one)."""
        force = msg.get("force", False)
        if not isinstance(force, bool):
            raise InvalidField("`force` must be true or false", id=msg.get("id"))
        return await self._command(conn, msg, "runner_delete", "runner_deleted",
                                   lambda client, cid: client.remove_container(cid, force=force))

    async def _command(self, conn: Any, msg: dict[str, Any], action: str, reply_type: str,
                       operation: Any) -> dict[str, Any]:
        key = _runner_arg(msg)
        selector = self.runner_label
        target = {"id": None, "name": key}

        def run(client: Any) -> dict[str, Any]:
            info = client.inspect_container(key)
            target["id"], target["name"] = info["Id"], info.get("Name", "").lstrip("/")
            if not _matches((info.get("Config") or {}).get("Labels"), selector):
                raise ContainerNotFound(f"{key} is not a runner (no label {selector})")
            operation(client, info["Id"])
            return target

        try:
            await self.engine.call(run, container=key)
        except WirehubError as exc:
            exc.id = msg.get("id")
            self._audit(conn, action, target, exc.code)
            raise exc from None
        self._audit(conn, action, target, "ok")
        reply: dict[str, Any] = {"type": reply_type, "runner": target["id"], "name": target["name"]}
        if msg.get("id") is not None:
            reply["id"] = msg["id"]
        return reply

    @staticmethod
    def _audit(conn: Any, action: str, target: dict[str, Any], result: str) -> None:
        principal = getattr(conn, "principal", None)
        sub = getattr(principal, "sub", None) or "anonymous"
        remote = conn.remote_address[0] if getattr(conn, "remote_address", None) else None
        audit.info("%s %s by %s: %s", action, target["name"], sub, result,
                   extra={"action": action, "runner": target["id"], "runner_name": target["name"],
                          "sub": sub, "client_id": conn.client_id, "remote": remote, "result": result})

    def _audit_refusals(self, conn: Any, msg: Any) -> None:
        if getattr(msg, "type", None) not in COMMANDS:
            return
        principal = getattr(conn, "principal", None)
        if principal is None or not principal.has_permission(PERMISSION):
            runner = msg.body.get("runner")
            self._audit(conn, msg.type, {"id": None, "name": runner if isinstance(runner, str) else None},
                        "forbidden")
