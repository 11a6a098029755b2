"""The Docker engine as the sources see it: clients, a worker pool, error codes.

The docker SDK is blocking. Short calls (inspect, list, stop, remove) run on
a small thread pool through ``Engine.call``; each long-lived stream (a
container's logs, the events) runs on its own thread with its own
``APIClient``, because a streaming response holds its HTTP connection until
it is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from ..protocol.errors import (ContainerNotFound, EngineError, EngineForbidden, EngineUnavailable,
                               WirehubError)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0


def _caused_by(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class Engine:
    """One Docker engine, reached through the docker SDK.

    Args:
        docker_host: ``unix:///path``, ``tcp://host:port``...; None: the
            SDK's environment handling (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``,
            ``DOCKER_CERT_PATH``; default ``unix:///var/run/docker.sock``).
        workers: threads for short blocking calls.
    """

    def __init__(self, docker_host: str | None = None, *, workers: int = 4,
                 timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.docker_host = docker_host
        self.timeout_s = timeout_s
        self._version: str | None = None
        self._lock = threading.Lock()
        self._shared: docker.APIClient | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="wirehub-docker")

    @property
    def address(self) -> str:
        """Where the engine is expected, for messages."""
        if self.docker_host:
            return self.docker_host
        return docker.utils.kwargs_from_env().get("base_url") or "unix:///var/run/docker.sock"

    def client(self) -> docker.APIClient:
        """A new low-level client (blocking; call it on a worker thread).

        The API version is negotiated with the engine once and reused.

        Raises:
            EngineUnavailable, EngineForbidden: the engine cannot be reached.
        """
        kwargs: dict[str, Any] = ({"base_url": self.docker_host} if self.docker_host
                                  else docker.utils.kwargs_from_env())
        try:
            api = docker.APIClient(version=self._version or "auto", timeout=self.timeout_s, **kwargs)
        except Exception as exc:
            raise self.describe(exc) from None
        self._version = api.api_version
        return api

    def forget_version(self) -> None:
        """Negotiate the API version again on the next client (the engine may have changed)."""
        self._version = None
        with self._lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()

    def _shared_client(self) -> docker.APIClient:
        with self._lock:
            if self._shared is None:
                self._shared = self.client()
            return self._shared

    async def call(self, fn: Callable[..., T], *args: Any, container: str | None = None) -> T:
        """Run ``fn(client, *args)`` on the worker pool with a shared client.

        Raises:
            WirehubError: the engine's failure as an error code (``describe``;
                ``container`` names the container in a not-found message).
        """
        def run() -> T:
            try:
                return fn(self._shared_client(), *args)
            except Exception as exc:
                error = self.describe(exc, container)
                if isinstance(error, EngineUnavailable):
                    self.forget_version()
                raise error from None
        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    def describe(self, exc: BaseException, container: str | None = None) -> WirehubError:
        """Map a docker SDK / transport exception to a wirehub error code."""
        if isinstance(exc, WirehubError):
            return exc
        # The SDK wraps some answers (the version negotiation's) in a DockerException.
        api_error = _caused_by(exc, docker.errors.APIError)
        if isinstance(api_error, docker.errors.NotFound):
            what = f"no such container: {container}" if container else _explanation(api_error)
            return ContainerNotFound(what)
        if isinstance(api_error, docker.errors.APIError) and api_error.status_code is not None:
            if api_error.status_code in (401, 403):
                return EngineForbidden(f"the engine refused: {_explanation(api_error)}")
            return EngineError(f"the engine answered {api_error.status_code}: {_explanation(api_error)}")
        if _caused_by(exc, PermissionError) is not None:
            return EngineForbidden(f"permission denied on the engine socket {self.address}")
        if isinstance(exc, (requests.exceptions.RequestException, docker.errors.DockerException,
                            OSError, ConnectionError)):
            return EngineUnavailable(f"cannot reach the Docker engine at {self.address}")
        return EngineError(f"engine request failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()


def _explanation(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc).strip()

