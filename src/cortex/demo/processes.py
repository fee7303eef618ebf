"""Child processes of the demo: each logs to its own file and is found by its ``listening on`` line.

The demo runs for as long as the operator likes, so child output goes to files (printed, so they
can be tailed), never into this process's memory. Children start in their own session: Ctrl-C in
the terminal reaches only the demo, which then stops them in order (gateway first, registry last)
instead of every process racing to die at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

_LISTENING = re.compile(r"listening on (http://\S+)")
_METRICS = re.compile(r"metrics on (http://\S+)/metrics")


class ChildFailed(RuntimeError):
    """A child exited or stayed silent during start-up; the message ends with its log tail."""


@attrs.define
class Child:
    """One running program of the demo (registry, neuron or gateway)."""

    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    url: str = ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def find(self, pattern: re.Pattern[str]) -> str | None:
        match = pattern.search(self.log_text())
        return match.group(1).rstrip("/") if match else None

    def wait_listening(self, timeout: float) -> str:
        """Block until the child printed ``listening on URL``; returns the URL."""
        deadline = time.monotonic() + timeout
        while True:
            url = self.find(_LISTENING)
            if url:
                self.url = url
                return url
            if self.proc.poll() is not None:
                raise ChildFailed(
                    f"{self.name} exited with {self.proc.returncode} during start-up; "
                    f"its log ({self.log_path}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ChildFailed(
                    f"{self.name} did not start within {timeout:.0f}s; "
                    f"its log ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def metrics_url(self) -> str | None:
        """The gateway's Prometheus URL (``cortex serve`` prints it before ``listening on``)."""
        url = self.find(_METRICS)
        return f"{url}/metrics" if url else None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the programs drain and exit), then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_child(
    name: str, args: Sequence[str], log_dir: Path, env: dict[str, str] | None = None
) -> Child:
    """Start ``args`` with stdout+stderr appended to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Child(name=name, args=list(args), log_path=log_path, proc=proc)


def stop_all(children: Sequence[Child], timeout: float = 15.0) -> None:
    """The last started (the gateway) first, so no request reaches a stopping neuron; then the
    rest together (each drains on its own, in parallel), SIGKILL after ``timeout``."""
    if not children:
        return
    *rest, last = children
    last.stop(timeout)
    for child in rest:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in rest:
        child.stop(timeout)
