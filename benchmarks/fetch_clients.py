"""Which HTTP client moves a large file from an HF-compatible registry into a file fastest.

How the fetch mechanism of the huggingface source was chosen (docs/benchmarks.md, "Cold
start"): one 1 GiB file and four 256 MiB shards of random bytes, served by ``cortex registry
serve`` in its own process, fetched into files on the same disk by

- curl (one process, the files one after another; the reference the issue names),
- ``hf_hub_download`` (one call per file) and ``snapshot_download(max_workers=N)`` -- what
  huggingface_hub offers,
- ``hf_transfer`` (Rust, ranged and parallel) when it is importable (``pip install hf_transfer``,
  or ``--hf-transfer-path DIR`` for a copy installed with ``pip install --target DIR``),
- aiohttp, ranged, N parts at once, each written with ``pwrite``,
- stdlib ``http.client``, ranged, N threads, ``readinto`` one reusable buffer + ``pwrite``
  (what the source now does, see plugins/source_huggingface/.../transfer.py),

with N in ``--parallel`` (default 1,4,8). Variants take turns in each round; medians, min-max.

Run: ``python -m benchmarks.fetch_clients [--quick] [--rounds N] [--parallel 1,4,8]``
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.common import fmt, median, python_server, save, table

MiB = 1 << 20
BUFFER = 4 * MiB


def ranges(size: int, parts: int) -> list[tuple[int, int]]:
    step = -(-size // parts)
    return [(start, min(size, start + step) - 1) for start in range(0, size, step)]


Files = list[tuple[str, int]]


def _urls(registry: str, repo: str, files: Files) -> list[tuple[str, int]]:
    return [(f"{registry}/{repo}/resolve/main/{name}", size) for name, size in files]


def http_client(registry: str, repo: str, files: Files, out: Path, parallel: int) -> None:
    urls = _urls(registry, repo, files)

    def one(url: str, fd: int, start: int, end: int) -> None:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        conn.request("GET", parts.path, headers={"Range": f"bytes={start}-{end}"})
        response = conn.getresponse()
        view = memoryview(bytearray(BUFFER))
        pos = start
        while n := response.readinto(view):
            os.pwrite(fd, view[:n], pos)
            pos += n
        conn.close()
        assert pos == end + 1

    with ThreadPoolExecutor(parallel) as pool:
        fds = []
        jobs = []
        for i, (url, size) in enumerate(urls):
            fd = os.open(out / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(fd, size)
            fds.append(fd)
            jobs += [pool.submit(one, url, fd, a, b) for a, b in ranges(size, parallel)]
        for job in jobs:
            job.result()
        for fd in fds:
            os.close(fd)


def aiohttp_client(registry: str, repo: str, files: Files, out: Path, parallel: int) -> None:
    import aiohttp

    urls = _urls(registry, repo, files)

    async def main() -> None:
        gate = asyncio.Semaphore(parallel)
        async with aiohttp.ClientSession(read_bufsize=BUFFER) as session:

            async def one(url: str, fd: int, start: int, end: int) -> None:
                headers = {"Range": f"bytes={start}-{end}"}
                async with gate, session.get(url, headers=headers) as response:
                    pos = start
                    async for chunk in response.content.iter_chunked(BUFFER):
                        os.pwrite(fd, chunk, pos)
                        pos += len(chunk)
                    assert pos == end + 1

            jobs = []
            fds = []
            for i, (url, size) in enumerate(urls):
                fd = os.open(out / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
                os.ftruncate(fd, size)
                fds.append(fd)
                jobs += [one(url, fd, a, b) for a, b in ranges(size, parallel)]
            await asyncio.gather(*jobs)
            for fd in fds:
                os.close(fd)

    asyncio.run(main())


def curl(registry: str, repo: str, files: Files, out: Path, parallel: int) -> None:
    args = ["curl", "-s", "--fail"]
    for i, (url, _) in enumerate(_urls(registry, repo, files)):
        args += ["-o", str(out / f"f{i}"), url]
    subprocess.run(args, check=True)


def hf_hub(registry: str, repo: str, files: Files, out: Path, parallel: int) -> None:
    from huggingface_hub import hf_hub_download

    for name, _ in files:
        hf_hub_download(repo, name, endpoint=registry, cache_dir=out / "hf", token=False)


def snapshot(registry: str, repo: str, files: Files, out: Path, parallel: int) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo, endpoint=registry, cache_dir=out / "hf", token=False, max_workers=parallel
    )


def hf_transfer(registry: str, repo: str, files: Files, out: Path, parallel: int) -> None:
    import hf_transfer as native  # type: ignore[import-not-found]

    for i, (url, _) in enumerate(_urls(registry, repo, files)):
        native.download(url, str(out / f"f{i}"), max_files=parallel, chunk_size=10 * MiB)


Client = Callable[[str, str, Files, Path, int], None]
CLIENTS: dict[str, tuple[Client, bool]] = {
    # name: (function, whether --parallel applies)
    "curl": (curl, False),
    "hf_hub_download": (hf_hub, False),
    "snapshot_download": (snapshot, True),
    "hf_transfer": (hf_transfer, True),
    "aiohttp ranged": (aiohttp_client, True),
    "http.client ranged": (http_client, True),
}


def run(
    quick: bool,
    rounds: int,
    parallel: list[int],
    hf_transfer_path: str | None,
    clients: list[str] | None = None,
) -> Any:
    from cortex.testing.registry import publish_repo

    if hf_transfer_path:
        sys.path.insert(0, hf_transfer_path)
    total = 16 * MiB if quick else 1024 * MiB
    tmp = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    repos: dict[str, Files] = {
        "bench/single": [("model.safetensors", total)],
        "bench/sharded": [
            (f"model-0000{i}-of-00004.safetensors", total // 4) for i in (1, 2, 3, 4)
        ],
    }
    for repo, files in repos.items():
        folder = publish_repo(tmp / "repos", repo, {})
        for name, size in files:
            with open(folder / name, "wb") as f:
                for _ in range(size // MiB):
                    f.write(os.urandom(MiB))
    registry = python_server(
        "cortex.cli", "cortex", "registry", "serve", str(tmp / "repos"),
        "--listen", "127.0.0.1:0", "--log-level", "warning",
    ).start(timeout=60)  # fmt: skip
    assert registry.url is not None
    available = {k: v for k, v in CLIENTS.items() if not clients or k in clients}
    try:
        import hf_transfer  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        available.pop("hf_transfer", None)
    variants = [
        (name, n)
        for name, (_, scales) in available.items()
        for n in (parallel if scales else [1])
        if not (name == "snapshot_download" and n == 1)
    ]
    import httpx

    for repo in repos:  # the registry hashes each file once, before the clock runs
        httpx.get(f"{registry.url}/api/models/{repo}", timeout=600)
    runs: dict[tuple[str, str, int], list[float]] = {}
    try:
        for round_ in range(rounds):
            turn = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
            for repo, files in repos.items():
                for name, n in turn:
                    if name == "snapshot_download" and repo == "bench/single":
                        continue
                    out = tmp / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    started = time.perf_counter()
                    available[name][0](registry.url, repo, files, out, n)
                    runs.setdefault((repo, name, n), []).append(time.perf_counter() - started)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        registry.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    results: dict[str, Any] = {}
    rows = []
    for (repo, name, n), seconds in runs.items():
        mb_s = total / MiB / median(seconds)
        results.setdefault(repo, {})[f"{name} x{n}"] = {
            "runs_s": seconds,
            "median_s": median(seconds),
            "mb_per_s": mb_s,
        }
        rows.append(
            [
                repo,
                name,
                n,
                fmt(median(seconds)),
                f"{min(seconds):.2f}-{max(seconds):.2f}",
                fmt(mb_s, 0),
            ]
        )
    report = {
        "settings": {"rounds": rounds, "bytes": total, "parallel": parallel},
        "results": results,
    }
    save("fetch_clients", report)
    print(f"\nfetch into files, {total // MiB} MiB per repo (median of {rounds})")
    print(table(["repo", "client", "N", "s", "range s", "MB/s"], rows))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--parallel", default="1,4,8")
    parser.add_argument("--hf-transfer-path", default=None)
    parser.add_argument("--clients", default="", help=f"comma-separated, of: {', '.join(CLIENTS)}")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    chosen = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = set(chosen) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown client(s): {', '.join(sorted(unknown))}")
    parallel = [int(x) for x in args.parallel.split(",")]
    run(args.quick, rounds, parallel, args.hf_transfer_path, chosen or None)


if __name__ == "__main__":
    main()
