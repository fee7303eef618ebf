"""Download progress: a bar on a terminal, log lines otherwise, and the caller's callback always.

Bars are huggingface_hub's own tqdm (so ``HF_HUB_DISABLE_PROGRESS_BARS`` and its TTY detection
still apply), subclassed to count bytes themselves (a disabled tqdm stops counting) and forward
them. The parallel fetch (:mod:`download`) updates one bar per file from several connections at
once, through :meth:`FetchProgress.bar`, which serialises the updates; a file that goes through
``hf_hub_download`` instead gets :meth:`FetchProgress.tqdm_class`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from cortex.source import ProgressCallback

log = logging.getLogger("cortex_source_huggingface")

LOG_INTERVAL_SECONDS = 2.0


def format_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


class FetchProgress:
    """Progress of one fetch: forwards to ``callback`` and, off a terminal, logs every few
    seconds and when a file completes."""

    def __init__(
        self, model_id: str, callback: ProgressCallback | None, to_log: bool | None = None
    ) -> None:
        self.model_id = model_id
        self.callback = callback
        self.to_log = (not sys.stderr.isatty()) if to_log is None else to_log
        self._last_logged: dict[str, float] = {}

    def report(self, file: str, done: int, total: int | None) -> None:
        if self.callback is not None:
            self.callback(file, done, total)
        if not self.to_log:
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        last = self._last_logged.get(file)
        if last is not None and not finished and now - last < LOG_INTERVAL_SECONDS:
            return
        self._last_logged[file] = now
        if total:
            log.info(
                "fetching %s: %s %s / %s (%d%%)",
                self.model_id,
                file,
                format_bytes(done),
                format_bytes(total),
                int(100 * done / total),
            )
        else:
            log.info("fetching %s: %s %s", self.model_id, file, format_bytes(done))

    def bar(self, file: str, total: int | None) -> FileBar:
        """A byte counter for one file that several threads may update at once."""
        bar = self.tqdm_class(file)(
            total=total,
            initial=0,
            unit="B",
            unit_scale=True,
            name="huggingface_hub.http_get",
            disable=_hf_disable(),
        )
        return FileBar(bar)

    def tqdm_class(self, file: str) -> type[Any]:
        """A tqdm class for one file, to pass to ``hf_hub_download(tqdm_class=...)``."""
        from huggingface_hub.utils import tqdm as hf_tqdm

        progress = self

        class CountingBar(hf_tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["desc"] = file
                super().__init__(*args, **kwargs)
                self._done = int(kwargs.get("initial") or 0)
                self._expected = kwargs.get("total")
                progress.report(file, self._done, self._expected)

            def update(self, n: float | None = 1) -> bool | None:
                self._done += int(n or 0)
                progress.report(file, self._done, self._expected)
                return super().update(n)

        return CountingBar


class FileBar:
    """A tqdm bar behind a lock: ``update`` comes from every connection of a file."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


def _hf_disable() -> bool | None:
    """What huggingface_hub passes as tqdm's ``disable`` for a download: None (a bar only on a
    terminal) unless its logging or ``TQDM_POSITION`` says otherwise. A bar written to a log
    file would break a neuron's one-JSON-object-per-line log."""
    try:
        from huggingface_hub.utils import is_tqdm_disabled
    except ImportError:  # an older huggingface_hub: tqdm's own terminal detection
        return None
    level = logging.getLogger("huggingface_hub.file_download").getEffectiveLevel()
    return is_tqdm_disabled(level)
