"""``runners`` and ``runner:<id>`` channels: the containers, live, from the engine's events.

One thread follows ``GET /events`` (container events, filtered by the label
selector) for as long as the gateway runs. After the events stream is open
it lists the containers, so nothing that happens in between is missed; the
list becomes the loop's runner table. Each event then updates the table and
is published, on the loop, as::

    {"type": "runner_update", "action": "created"|"started"|"stopped"|"deleted",
     "runner": {"id", "name", "image", "status", "labels"}}

on ``runners`` and on every subscribed ``runner:<id>`` channel of that
container. A new subscriber first receives ``initial_state`` — every runner
in the table (one for ``runner:<id>``) — as a ``message`` whose offset is
the channel's latest, and is joined in the same callback: the table and the
updates after it fit together with nothing missing or repeated.

When the engine goes away, ``runners`` gets ``engine_status`` (unavailable)
and the thread reconnects with exponential backoff. On reconnect it lists
the containers again and publishes the difference (what was created,
started, stopped or deleted meanwhile) after ``engine_status`` (available).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import msgspec

from ..protocol.errors import ContainerNotFound, EngineUnavailable, Forbidden, InvalidField, WirehubError
from ..protocol.messages import Error, Subscribe, Subscribed
from .base import Answer, Handoff, SourceHost, Subscriber
from .docker_engine import Engine

logger = logging.getLogger("wirehub.sources.docker_events")

RUNNERS = "runners"
PREFIX = "runner:"
SNAPSHOT, EVENT, DOWN = "snapshot", "event", "down"

# Engine container actions → (runner_update action, runner status).
ACTIONS = {
    "create": ("created", "created"),
    "start": ("started", "running"),
    "die": ("stopped", "exited"),
    "destroy": ("deleted", "removed"),
}
_NOT_LABELS = frozenset({"name", "image", "exitCode", "signal", "execID", "execDuration"})


class Runner(msgspec.Struct, gc=False):
    id: str
    name: str
    image: str
    status: str
    labels: dict[str, str]


class RunnerUpdate(msgspec.Struct, tag_field="type", tag="runner_update", gc=False):
    action: str
    runner: Runner


class InitialState(msgspec.Struct, tag_field="type", tag="initial_state", gc=False):
    runners: list[Runner]


class EngineStatus(msgspec.Struct, tag_field="type", tag="engine_status", omit_defaults=True, gc=False):
    status: str                  # "available" or "unavailable"
    code: str | None = None
    error: str | None = None


def runner_from_listing(entry: dict[str, Any]) -> Runner:
    """A runner from ``GET /containers/json``."""
    names = entry.get("Names") or []
    return Runner(entry["Id"], names[0].lstrip("/") if names else entry["Id"][:12],
                  entry.get("Image", ""), entry.get("State", ""), dict(entry.get("Labels") or {}))


def update_from_event(event: dict[str, Any], known: Runner | None) -> tuple[str, Runner] | None:
    """``(action, runner)`` for an engine container event, or None for actions runners do not show."""
    mapped = ACTIONS.get(event.get("Action") or event.get("status") or "")
    if mapped is None or event.get("Type", "container") != "container":
        return None
    action, status = mapped
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    container_id = actor.get("ID") or event.get("id", "")
    if known is not None:
        runner = msgspec.structs.replace(known, status=status)
    else:
        labels = {k: v for k, v in attributes.items() if k not in _NOT_LABELS}
        runner = Runner(container_id, attributes.get("name", container_id[:12]),
                        attributes.get("image", ""), status, labels)
    return action, runner


class DockerEventsSource:
    """The ``runners`` and ``runner:<id>`` channels (a ``Source``).

    Args:
        engine: the Docker engine.
        label: only containers with this label (``key`` or ``key=value``).
        backoff_initial_s, backoff_max_s: reconnect delays after the engine went away.
    """

    def __init__(self, engine: Engine, *, label: str | None = None, backoff_initial_s: float = 0.1,
                 backoff_max_s: float = 2.0) -> None:
        self.engine = engine
        self.label = label
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.runners: dict[str, Runner] = {}
        self.available = False
        self.connected_once = False
        self._attempted = False
        self.reconnects = 0
        self._error: WirehubError = EngineUnavailable("the Docker engine has not been reached yet")
        self._host: SourceHost | None = None
        self._offsets: dict[str, int] = {}
        self._by_container: dict[str, set[str]] = {}   # container id → its runner:<x> channels
        self._channel_container: dict[str, str] = {}
        self._pending: dict[tuple[str, str], tuple[Subscriber, str, Subscribe, Answer]] = {}
        self._handoff: Handoff | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._thread: threading.Thread | None = None

    # -- Source ---------------------------------------------------------------

    def owns(self, channel: str) -> bool:
        return channel == RUNNERS or channel.startswith(PREFIX)

    def shares(self, channel: str) -> bool:
        return False  # each gateway watches its engine's events itself

    def bind(self, host: SourceHost) -> None:
        self._host = host

    async def start(self) -> None:
        self._handoff = Handoff(asyncio.get_running_loop(), self._deliver, max_items=4096, batch_items=256)
        self._thread = threading.Thread(target=self._run, name="wirehub-docker-events", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._closed.set()
        if self._handoff is not None:
            self._handoff.close()
        self._cancel_stream()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2.0)
        for _, _, request, answer in self._pending.values():
            answer(Error(self._error.code, "the gateway is shutting down", request.id))
        self._pending.clear()

    def subscribe(self, conn: Subscriber, channel: str, request: Subscribe, answer: Answer) -> bool:
        if request.tail is not None:
            raise InvalidField("`tail` is only supported on logs:<container> channels")
        if channel != RUNNERS and len(channel) == len(PREFIX):
            raise ContainerNotFound("runner:<id> needs a container id or name")
        if not self._attempted:  # the first connection attempt has not finished: wait for it
            self._pending[(conn.client_id, channel)] = (conn, channel, request, answer)
            return False
        self._admit(conn, channel, request, answer)
        return False

    def cancel(self, conn: Subscriber, channel: str) -> bool:
        return self._pending.pop((conn.client_id, channel), None) is not None

    def forget(self, conn: Subscriber) -> None:
        for key in [k for k in self._pending if k[0] == conn.client_id]:
            del self._pending[key]

    def vacated(self, channel: str) -> None:
        container_id = self._channel_container.pop(channel, None)
        if container_id is not None:
            channels = self._by_container.get(container_id)
            if channels is not None:
                channels.discard(channel)
                if not channels:
                    del self._by_container[container_id]

    # -- the loop side ----------------------------------------------------------

    def find(self, key: str) -> Runner | None:
        """The runner with this id, name or unique id prefix."""
        runner = self.runners.get(key)
        if runner is not None:
            return runner
        for runner in self.runners.values():
            if runner.name == key:
                return runner
        if len(key) >= 4:
            matches = [r for r in self.runners.values() if r.id.startswith(key)]
            if len(matches) == 1:
                return matches[0]
        return None

    def _admit(self, conn: Subscriber, channel: str, request: Subscribe, answer: Answer) -> None:
        if not self._host.allowed(conn, channel):
            answer(Error(Forbidden.code, f"not allowed to subscribe to {channel[:64]!r}", request.id))
            return
        if not self.available:
            answer(Error(self._error.code, self._error.message, request.id))
            return
        if channel == RUNNERS:
            runners = list(self.runners.values())
        else:
            runner = self.find(channel[len(PREFIX):])
            if runner is None:
                answer(Error(ContainerNotFound.code, f"no such container: {channel[len(PREFIX):]}",
                             request.id))
                return
            runners = [runner]
            self._channel_container[channel] = runner.id
            self._by_container.setdefault(runner.id, set()).add(channel)
        answer(Subscribed(channel, request.id))
        state = msgspec.json.encode(InitialState(runners))
        self._host.send_history(conn, channel, [(self._offsets.get(channel, 0), state)])
        self._host.join(conn, channel)

    def _publish(self, channel: str, payload: Any) -> None:
        # This gateway's own channels (not shared): the position comes at once.
        self._offsets[channel] = self._host.emit(channel, msgspec.json.encode(payload)).offset

    def _update(self, action: str, runner: Runner) -> None:
        if action == "deleted":
            self.runners.pop(runner.id, None)
        else:
            self.runners[runner.id] = runner
        update = RunnerUpdate(action, runner)
        self._publish(RUNNERS, update)
        for channel in sorted(self._by_container.get(runner.id, ())):
            self._publish(channel, update)

    def _deliver(self, items: list[Any]) -> None:
        for kind, value in items:
            if kind == EVENT:
                self._apply_event(value)
            elif kind == SNAPSHOT:
                self._apply_snapshot(value)
            elif kind == DOWN:
                self._went_down(value)

    def _apply_event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        known = self.runners.get(actor.get("ID") or event.get("id", ""))
        mapped = update_from_event(event, known)
        if mapped is None:
            return
        action, runner = mapped
        # The listing and the events overlap by design: skip what the table already says.
        if known is not None and (action == "created" or known.status == runner.status):
            return
        if known is None and action == "deleted":
            return
        self._update(action, runner)

    def _apply_snapshot(self, runners: list[Runner]) -> None:
        first = not self.connected_once
        self.connected_once = self._attempted = True
        was_available, self.available = self.available, True
        if first:
            self.runners = {r.id: r for r in runners}
        else:
            if not was_available:
                logger.warning("Docker engine available again")
                self._publish(RUNNERS, EngineStatus("available"))
            fresh = {r.id: r for r in runners}
            for runner_id, old in list(self.runners.items()):
                if runner_id not in fresh:
                    self._update("deleted", msgspec.structs.replace(old, status="removed"))
            for runner in runners:
                old = self.runners.get(runner.id)
                if old is None:
                    self._update("created", runner)
                elif old.status != runner.status:
                    self._update("started" if runner.status == "running" else "stopped", runner)
        self._admit_pending()

    def _went_down(self, error: WirehubError) -> None:
        if not self._attempted:
            logger.warning("Docker engine unavailable, retrying in the background: %s", error.message)
        self._error = error
        self._attempted = True
        if self.available:
            self.available = False
            logger.warning("Docker engine unavailable: %s", error.message)
            self._publish(RUNNERS, EngineStatus("unavailable", error.code, error.message))
        self._admit_pending()

    def _admit_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for conn, channel, request, answer in pending.values():
            self._admit(conn, channel, request, answer)

    # -- the events thread --------------------------------------------------------

    def _cancel_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass

    def _run(self) -> None:
        delay = self.backoff_initial_s
        filters: dict[str, Any] = {"type": ["container"]}
        list_filters: dict[str, Any] = {}
        if self.label:
            filters["label"] = list_filters["label"] = [self.label]
        while not self._closed.is_set():
            client = None
            try:
                client = self.engine.client()
                stream = client.events(decode=True, filters=filters)
                with self._lock:
                    if self._closed.is_set():
                        stream.close()
                        return
                    self._stream = stream
                listing = client.containers(all=True, filters=list_filters)
                if not self._handoff.put([((SNAPSHOT, [runner_from_listing(c) for c in listing]), 0)]):
                    return
                delay = self.backoff_initial_s
                for event in stream:
                    if not self._handoff.put([((EVENT, event), 0)]):
                        return
                if self._closed.is_set():
                    return
                error: WirehubError = EngineUnavailable(
                    f"the Docker engine at {self.engine.address} closed the events stream")
            except Exception as exc:
                if self._closed.is_set():
                    return
                error = self.engine.describe(exc)
            finally:
                self._cancel_stream()
                if client is not None:
                    client.close()
            self.engine.forget_version()
            self.reconnects += 1
            if not self._handoff.put([((DOWN, error), 0)]):
                return
            self._closed.wait(delay)
            delay = min(delay * 2, self.backoff_max_s)
