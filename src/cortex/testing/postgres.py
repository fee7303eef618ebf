"""A real PostgreSQL server for tests: ``initdb`` into a temporary folder, ``pg_ctl start`` on a
free loopback port (and a Unix socket in that folder), stopped and removed afterwards.

The binaries are Debian's (``make postgres`` installs the ``postgresql`` package where it is
missing): ``CORTEX_PG_BIN`` names their folder, else the newest ``/usr/lib/postgresql/*/bin``,
else ``initdb`` on ``PATH``. PostgreSQL refuses to run as root, so under root the server runs
as the ``postgres`` user that Debian's package creates (or ``nobody``), owning its folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import attrs

PG_BIN_ENV = "CORTEX_PG_BIN"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here (tests skip with this reason)."""


def find_bin() -> Path:
    configured = os.environ.get(PG_BIN_ENV)
    if configured:
        return Path(configured)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2] or 0))
    if found:
        return Path(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise PostgresUnavailable(
        "no PostgreSQL binaries (initdb, pg_ctl): run 'make postgres' (Debian's postgresql "
        f"package) or set {PG_BIN_ENV}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    """The user the server runs as when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresUnavailable("running as root and no 'postgres' or 'nobody' user to run as")


@attrs.define
class RunningPostgres:
    bin: Path
    root: Path
    port: int
    user: str | None
    log: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://cortex@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off"
        done = self._pg_ctl("-l", str(self.log), "-o", options, "-w", "start")
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{log[-2000:]}")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> RunningPostgres:
    """initdb + start; the caller calls :meth:`RunningPostgres.remove`."""
    pg_bin = find_bin()
    user = _run_as()
    # Not under pytest's tmp_path: its parents are private to root, and the server's user
    # must reach its folder.
    root = Path(tempfile.mkdtemp(prefix="cortex-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    done = subprocess.run(
        [
            str(pg_bin / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "cortex",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        user=user,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
    running = RunningPostgres(pg_bin, root, _free_port(), user, root / "server.log")
    running.start()
    return running
