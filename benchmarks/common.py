"""Shared by the benchmarks: child processes, CPU accounting, the load generators, statistics.

CPU is read from the kernel for the *proxy's* whole process tree (user + system), before and after
a measured run, so "CPU per request" excludes the load generator and the upstream that share the
machine. It is the figure that carries over between machines best; wall-clock figures do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psutil

from cortex.testing.servers import ProcessServer

ROOT = Path(__file__).resolve().parent
# CORTEX_BENCH_RESULTS redirects results (the smoke tests write to a temporary folder).
RESULTS = Path(os.environ.get("CORTEX_BENCH_RESULTS") or ROOT / "results")
DOCS = ROOT.parent / "docs"


def machine() -> dict[str, Any]:
    """What the figures were measured on (absolute times are only valid for this)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path


def cpu_layout() -> tuple[set[int], set[int]] | None:
    """(the proxy's cores, everyone else's cores), or None where that cannot be arranged.

    Why: on a small machine the proxy under test, the upstream and the load generator fight
    for the same cores, and a stream's wall time then measures the scheduler more than the
    proxy (nginx "added" 6 ms to a 256-chunk stream in one such run). Giving the proxy one core
    of its own -- "one worker each" -- and everything else the rest makes variants comparable."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def pin_tree(pid: int, cores: set[int]) -> None:
    """Run every thread of ``pid`` and of its descendants on ``cores`` only."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            threads = proc.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread.id, cores)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its descendants, now.

    Read in nanoseconds from ``/proc/PID/task/*/schedstat`` where the kernel has it: the
    clock-tick counters (``cpu_times``, 10 ms steps) round a short measurement, such as the few
    streams of a ``--quick`` run, to zero. Threads that already exited are not in that sum,
    which is why it is taken around each measurement, never across a process's life."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        precise = _schedstat_seconds(p.pid)
        if precise is not None:
            total += precise
            continue
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _schedstat_seconds(pid: int) -> float | None:
    """CPU time of every live thread of ``pid`` in seconds, or None where the kernel does not
    expose ``schedstat`` (the caller falls back to clock ticks)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total_ns = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended between the listing and the read
        except (OSError, ValueError, IndexError):
            return None
    return total_ns / 1e9


def rss_bytes(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def python_server(module: str, *args: str, env: dict[str, str] | None = None) -> ProcessServer:
    return ProcessServer([sys.executable, "-m", module, *args], env=env, cwd=str(ROOT.parent))


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


# ---- wrk (plain requests) ------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


@attrs.frozen
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    proxy_cpu_s: float

    @property
    def cpu_per_request_ms(self) -> float:
        return self.proxy_cpu_s / self.requests * 1000 if self.requests else float("nan")


def combine_slices(slices: list[LoadResult]) -> LoadResult:
    """Several short runs of one variant as one: requests/s and CPU per request over all of
    them, p50/p99 as the median of the slices' (a burst of background load spoils one slice,
    not the variant)."""
    seconds = sum(r.seconds for r in slices)
    requests = sum(r.requests for r in slices)
    return LoadResult(
        requests=requests,
        seconds=seconds,
        rps=requests / seconds if seconds else 0.0,
        p50_ms=median([r.p50_ms for r in slices]),
        p99_ms=median([r.p99_ms for r in slices]),
        errors=sum(r.errors for r in slices),
        proxy_cpu_s=sum(r.proxy_cpu_s for r in slices),
    )


def _wrk_ms(text: str, label: str) -> float:
    match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(
    url: str, model: str, concurrency: int, seconds: float, proxy_pid: int | None, key: str = "x"
) -> LoadResult:
    """``wrk`` POSTs for ``seconds`` at ``concurrency`` connections (one thread per 32)."""
    if shutil.which("wrk") is None:
        return python_load(url, model, concurrency, seconds, proxy_pid, key)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (model, key))
        script = f.name
    threads = max(1, min(2, concurrency // 32 + 1))
    before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            script,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    used = (cpu_seconds(proxy_pid) - before) if proxy_pid else 0.0
    os.unlink(script)
    text = out.stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if not total:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    requests = int(total.group(1))
    dur = float(total.group(2)) * {"s": 1.0, "ms": 0.001, "m": 60.0}.get(total.group(3), 1.0)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return LoadResult(
        requests=requests,
        seconds=dur,
        rps=requests / dur if dur else 0.0,
        p50_ms=_wrk_ms(text, "50%"),
        p99_ms=_wrk_ms(text, "99%"),
        errors=errors,
        proxy_cpu_s=used,
    )


def python_load(
    url: str, model: str, concurrency: int, seconds: float, proxy_pid: int | None, key: str = "x"
) -> LoadResult:
    """The fallback when ``wrk`` is missing: ``concurrency`` aiohttp workers POSTing in a loop.
    It costs far more CPU per request than wrk, so requests/s are lower on a small machine; the
    proxy's CPU per request stays comparable (``benchmarks`` prints which generator ran)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {key}"}

    async def run() -> LoadResult:
        latencies: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    try:
                        async with session.post(url, json=body, headers=headers) as resp:
                            await resp.read()
                            if resp.status != 200:
                                errors += 1
                    except aiohttp.ClientError:
                        errors += 1
                    latencies.append((time.perf_counter() - started) * 1000)

            before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
            used = (cpu_seconds(proxy_pid) - before) if proxy_pid else 0.0
        return LoadResult(
            requests=len(latencies),
            seconds=elapsed,
            rps=len(latencies) / elapsed if elapsed else 0.0,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            errors=errors,
            proxy_cpu_s=used,
        )

    return asyncio.run(run())


def load_generator() -> str:
    return "wrk" if shutil.which("wrk") else "python (aiohttp; wrk is not installed)"


# ---- a light asyncio client for streams ----------------------------------------------------


@attrs.frozen
class StreamResult:
    streams: int
    chunks: int
    ttft_ms: list[float]
    total_ms: list[float]
    proxy_cpu_s: float

    @property
    def cpu_per_chunk_us(self) -> float:
        return self.proxy_cpu_s / self.chunks * 1e6 if self.chunks else float("nan")


async def _one_stream(
    session: aiohttp.ClientSession, url: str, model: str, chunks: int, key: str
) -> tuple[float, float, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": chunks,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    count = 0
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"stream answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: ") and b'"content"' in line:
                if first is None and b'"content": ""' not in line and b'"content":""' not in line:
                    first = time.perf_counter()
                count += 1
    done = time.perf_counter()
    return ((first or done) - started) * 1000, (done - started) * 1000, count


@attrs.frozen
class StreamTarget:
    name: str
    url: str
    model: str
    pid: int | None
    key: str = "x"


def run_streams_interleaved(
    targets: list[StreamTarget], chunks: int, rounds: int
) -> dict[str, StreamResult]:
    """``rounds`` rounds of one stream per target, in turn: a burst of background load then
    hits every variant alike, and round ``i`` of two variants can be compared pairwise (streams
    of one variant measured in one block, minutes apart from the next, moved by several ms
    between runs on a shared machine). CPU is read around each stream of a proxy."""

    async def run() -> dict[str, StreamResult]:
        timeout = aiohttp.ClientTimeout(total=120)
        ttft: dict[str, list[float]] = {t.name: [] for t in targets}
        totals: dict[str, list[float]] = {t.name: [] for t in targets}
        seen = dict.fromkeys(ttft, 0)
        used = dict.fromkeys(ttft, 0.0)
        sessions = {t.name: aiohttp.ClientSession(timeout=timeout) for t in targets}
        try:
            for t in targets:  # warm each connection
                await _one_stream(sessions[t.name], t.url, t.model, chunks, t.key)
            for _ in range(rounds):
                for t in targets:
                    before = cpu_seconds(t.pid) if t.pid else 0.0
                    first, total, count = await _one_stream(
                        sessions[t.name], t.url, t.model, chunks, t.key
                    )
                    if t.pid:
                        used[t.name] += cpu_seconds(t.pid) - before
                    ttft[t.name].append(first)
                    totals[t.name].append(total)
                    seen[t.name] += count
        finally:
            for session in sessions.values():
                await session.close()
        return {
            t.name: StreamResult(rounds, seen[t.name], ttft[t.name], totals[t.name], used[t.name])
            for t in targets
        }

    return asyncio.run(run())


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)
