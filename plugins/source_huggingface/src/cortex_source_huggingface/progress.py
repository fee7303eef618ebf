"""Download progress: a bar on a terminal, log lines otherwise, and the caller's callback always.

huggingface_hub reports bytes through a tqdm class it instantiates per file; we hand it a
subclass of its own tqdm (so ``HF_HUB_DISABLE_PROGRESS_BARS`` and its TTY detection still apply)
that also counts bytes itself (a disabled tqdm stops counting) and forwards them.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from cortex.source import ProgressCallback

log = logging.getLogger("cortex_source_huggingface")

LOG_INTERVAL_SECONDS = 2.0


def _format_bytes(value: float) -> str:
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
                _format_bytes(done),
                _format_bytes(total),
                int(100 * done / total),
            )
        else:
            log.info("fetching %s: %s %s", self.model_id, file, _format_bytes(done))

    def tqdm_class(self, file: str) -> type[Any]:
        """A tqdm class for one file, to pass to ``hf_hub_download(tqdm_class=...)``."""
        from huggingface_hub.utils import tqdm as hf_tqdm

        progress = self

        class FileBar(hf_tqdm):
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

        return FileBar
