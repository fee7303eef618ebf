"""Run real servers on loopback for tests: an ASGI app in a uvicorn thread, or a subprocess.

Both bind port 0 and report the port the OS chose, so tests never collide on ports.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import uvicorn


class UvicornThread:
    """An ASGI app served by uvicorn on ``127.0.0.1:0`` in a background thread.

    ``url`` is known once :meth:`start` returns. :meth:`stop` shuts the server down (note: open
    keep-alive connections of *clients* may survive; a "server is gone" test needs a subprocess).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", **config: Any) -> None:
        self.app = app
        self.host = host
        self.scheme = "https" if config.get("ssl_certfile") else "http"
        self._config = uvicorn.Config(
            app, host=host, port=0, log_level="warning", lifespan="on", **config
        )
        self.server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._run, name="uvicorn-test", daemon=True)
        self.port: int | None = None

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self, timeout: float = 30.0) -> UvicornThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn server did not start in time")
            time.sleep(0.01)
        sockets = [s for server in self.server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LISTENING = re.compile(rb"listening on (https?://\S+)")


class ProcessServer:
    """A server started as a real process that prints ``listening on http://HOST:PORT``.

    cortex's own programs (``neuron run``, ``cortex serve``, ``cortex registry serve``) print
    that line once their socket is bound, so ``--listen 127.0.0.1:0`` works in tests.
    """

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> None:
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.output = bytearray()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> ProcessServer:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
        )
        found = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in iter(self.proc.stdout.readline, b""):
                self.output.extend(line)
                match = _LISTENING.search(line)
                if match and self.url is None:
                    self.url = match.group(1).decode().rstrip("/")
                    found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.args[0]} exited with {self.proc.returncode}:\n{self.text}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.args} did not report a listening URL:\n{self.text}")
        return self

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; returns the exit code (kills after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def python_program(module: str, *args: str) -> list[str]:
    """argv for running a cortex program with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", module, *args]


def free_port() -> int:
    """A port that was free a moment ago (only for programs that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
