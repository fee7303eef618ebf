"""The record of one client request: its metrics and its request-log line, written exactly once.

Why one object: a request can end in many places -- the neuron's answer ends, the client goes
away mid-stream, the route fails before a node was picked, a kept-alive stream hears of an error
after its HTTP status was sent. Each of those used to count the request itself, and a flag on the
exception (``recorded``) kept three layers from counting one failure twice. Now the endpoint
opens a :class:`Tally`, everything on the way reports to it, and the first end wins: :meth:`end`
(a node answered, or was being asked) or :meth:`fail` (no node answered) -- later calls are
no-ops. The tally also gives the request's :class:`cortex.gateway.scheduler.Lease` back when it
ends, so the request's admission slot and in-flight count end with it.

It is the observer the proxy and the answer policies report to (first content token, usage,
end); see :class:`cortex.gateway.proxy.Observer`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cortex.gateway.metrics import NO_NODE, GatewayMetrics, RequestSeries, code_label, route_label
from cortex.gateway.recent_errors import RecentErrors
from cortex.logging import request_logger
from cortex.wire.errors import ApiError

if TYPE_CHECKING:
    from cortex.gateway.accounting import Accounting
    from cortex.gateway.limits import KeyState, Limits
    from cortex.gateway.scheduler import Lease
    from cortex.keyfile import ApiKey

request_log = request_logger()


class Recorder:
    """Where tallies write: the gateway's metrics, the request log, the recent errors
    (``/admin/status`` and the dashboard), and how to label a model a client named (a known
    canonical id, else ``other``: bounded labels)."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        model_label: Callable[[object], str],
        recent_errors: RecentErrors | None = None,
        limits: Limits | None = None,
        accounting: Accounting | None = None,
    ) -> None:
        self.metrics = metrics
        self.model_label = model_label
        self.recent_errors = recent_errors if recent_errors is not None else RecentErrors()
        self.limits = limits
        self.accounting = accounting

    def open(self, route: str, key: ApiKey | None = None) -> Tally:
        tally = Tally(self, route)
        if key is not None and self.limits is not None:
            tally.key = key
            tally.account = self.limits.state(key)
        return tally

    def key_ended(
        self, tally: Tally, model: str, prompt: int, completion: int, seconds: float, error: bool
    ) -> None:
        """A request with a key ended: its exact tokens against the key's allowance, its usage
        row, its per-key series."""
        account = tally.account
        assert account is not None
        account.charge(prompt + completion - tally.charged, time.monotonic())
        tally.charged = prompt + completion
        if self.accounting is not None:
            self.accounting.record(account.name, model, prompt, completion, seconds, error)
        if tally.cut:
            self.metrics.key_limited.labels(account.name, "budget_cut").inc()
        series = self.metrics.key_series(account.name, model)
        (series.error if error else series.ok).inc()
        if prompt:
            series.prompt_tokens.inc(prompt)
        if completion:
            series.completion_tokens.inc(completion)


class Tally:
    """See the module docstring."""

    __slots__ = (
        "_canonical",
        "_completion",
        "_first",
        "_node",
        "_prompt",
        "_recorder",
        "_series",
        "_streamed",
        "account",
        "charged",
        "cut",
        "ended",
        "key",
        "lease",
        "limit_headers",
        "requested",
        "route",
        "started",
    )

    def __init__(self, recorder: Recorder, route: str) -> None:
        self._recorder = recorder
        self.route = route
        self.started = time.monotonic()
        self.requested: object = None  # the model field, once the body is parsed
        self.lease: Lease | None = None
        self.ended = False
        self._series: RequestSeries | None = None
        self._node = NO_NODE
        self._canonical = ""
        self._first = 0.0
        self._prompt = 0
        self._completion = 0
        # A request with a key (cortex.gateway.limits): who, its account, the tokens charged to
        # it so far, output tokens counted as they streamed, the rate-limit headers of its
        # answer, and whether its stream was ended at the key's budget.
        self.key: ApiKey | None = None
        self.account: KeyState | None = None
        self.charged = 0
        self._streamed = 0
        self.limit_headers: dict[str, str] | None = None
        self.cut = False

    @property
    def metered(self) -> bool:
        """Whether this request's output tokens are counted as they stream (its key has a
        tokens-per-minute rate or a token budget)."""
        account = self.account
        return account is not None and account.key.limits.meters_tokens

    # ---- the node being asked -----------------------------------------------------------------

    def bind(self, lease: Lease) -> None:
        """The request is being sent to ``lease.node``: count it in flight there."""
        self.lease = lease
        self._node = lease.node.name
        self._canonical = lease.resolved.canonical
        series = self._recorder.metrics.series(self.route, self._canonical, self._node)
        series.in_flight.inc()
        self._series = series

    def unbind(self) -> None:
        """That node could not take it (nothing was relayed): no longer in flight there."""
        if self._series is not None:
            self._series.in_flight.dec()
            self._series = None
        self._node = NO_NODE

    # ---- the observer interface (cortex.gateway.proxy.Observer) ---------------------------

    def on_first_token(self) -> None:
        """A streamed answer's first chunk carrying content (not its first byte)."""
        if not self._first:
            self._first = time.monotonic()
            if self._series is not None:
                self._series.ttft.observe(self._first - self.started)

    def on_usage(self, usage: dict[str, Any]) -> None:
        """Token counts a neuron reported (the last report wins)."""
        prompt, done = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self._prompt = prompt
        if isinstance(done, int):
            self._completion = done
        account = self.account
        if account is not None:
            total = self._prompt + max(self._completion, self._streamed)
            account.charge(total - self.charged, time.monotonic())
            self.charged = total

    def on_streamed(self, tokens: int) -> bool:
        """``tokens`` more output tokens streamed (counted from the frames, before the usage
        report): charged to the key at once. False when the key's budget is spent: the stream
        ends there (:mod:`cortex.gateway.metering`)."""
        account = self.account
        if account is None:
            return True
        self._streamed += tokens
        total = self._prompt + max(self._completion, self._streamed)
        account.charge(total - self.charged, time.monotonic())
        self.charged = total
        left = account.budget_left()
        return left is None or left > 0

    def streamed_usage(self) -> tuple[int, int]:
        """(prompt, completion) as known now: what a stream ended at the budget reports."""
        return self._prompt, max(self._completion, self._streamed)

    def on_end(self, error: str | None) -> None:
        """The answer is over (``error``: its code, or None). The first end wins."""
        self.end(error)

    # ---- ends -------------------------------------------------------------------------------

    def end(self, error: str | None) -> None:
        """The node's answer is over (or the request was abandoned while a node was being
        asked): give the lease back and record the request against that node."""
        if self.ended:
            return
        self.ended = True
        if self.lease is not None:
            self.lease.release()
        if error is None and self.cut:
            error = "budget_exceeded"  # a stream ended at its key's budget
        series = self._series
        if series is None:  # no node was being asked after all
            self._record_failure(error or "internal_error", None, None)
            return
        self._series = None
        series.in_flight.dec()
        ended = time.monotonic()
        elapsed = ended - self.started
        series.duration.observe(elapsed)
        (series.error if error else series.ok).inc()
        prompt, done, first = self._prompt, self._completion, self._first
        if prompt:
            series.prompt_tokens.inc(prompt)
        if done:
            series.completion_tokens.inc(done)
        metrics = self._recorder.metrics
        if error:
            metrics.errors.labels(self.route, code_label(error)).inc()
            self._recorder.recent_errors.add(self.route, self._canonical, self._node, error)
        if first and done > 1 and ended > first:
            series.tokens_per_second.observe((done - 1) / (ended - first))
        key = self.key
        if key is not None:
            self._recorder.key_ended(self, self._canonical, prompt, done, elapsed, bool(error))
        if request_log.isEnabledFor(logging.INFO):  # skip building the line when off
            request_log.info(
                self.route,
                extra={
                    "fields": {
                        "key": key.name if key is not None else None,
                        "model": self._canonical,
                        "node": self._node,
                        "status": "error" if error else "ok",
                        "code": error,
                        "prompt_tokens": prompt,
                        "completion_tokens": done,
                        "ttft_s": round(first - self.started, 4) if first else None,
                        "duration_s": round(elapsed, 4),
                    }
                },
            )

    def fail(self, error: ApiError) -> None:
        """The request failed before any node answered it (a bad body, no route, a load that
        failed, a neuron that could not be reached): give the lease back and record the
        failure with no node. A no-op when the request was already recorded."""
        if self.ended:
            return
        self.ended = True
        self.unbind()
        if self.lease is not None:
            self.lease.release()
        self._record_failure(error.code, error.status, error.message)

    def _record_failure(self, code: str, status: int | None, message: str | None) -> None:
        recorder = self._recorder
        path = self.route[:200]  # the log line names the path asked for; metrics a bounded label
        route = route_label(self.route)
        requested = self.requested
        metrics = recorder.metrics
        metrics.requests.labels(route, recorder.model_label(requested), NO_NODE, "error").inc()
        metrics.errors.labels(route, code_label(code)).inc()
        shown = requested[:200] if isinstance(requested, str) else None
        recorder.recent_errors.add(path, shown, NO_NODE, code, status, message)
        key = self.key
        if key is not None:
            model = recorder.model_label(requested)
            seconds = time.monotonic() - self.started
            recorder.key_ended(self, model, self._prompt, self._completion, seconds, True)
        request_log.info(
            path,
            extra={
                "fields": {
                    "key": key.name if key is not None else None,
                    "model": shown,
                    "node": NO_NODE,
                    "status": "error",
                    "http_status": status,
                    "code": code,
                }
            },
        )
