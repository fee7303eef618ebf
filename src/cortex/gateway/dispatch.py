"""The one request mechanism: resolve the model, take a lease from the scheduler, send the
request to the lease's neuron, send it elsewhere while nothing was relayed, and hand the answer
to the route's policy (:mod:`cortex.gateway.policies`). Every generation route and
``count_tokens`` goes through :meth:`Dispatcher.serve`; only the policy differs.

Which neuron, and whether a cold load comes first, is the scheduler's decision
(:mod:`cortex.gateway.scheduler`); sending, holding a ``queue_full`` answer and the connection
retry are :mod:`cortex.gateway.proxy`'s; counting and logging the request is its tally's
(:mod:`cortex.gateway.tally`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import aiohttp
from starlette.responses import Response

from cortex.auth import without_credentials
from cortex.config import CortexConfig
from cortex.gateway.limits import KeyState, LimitError, Limits
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.policies import AnswerPolicy
from cortex.gateway.proxy import UpstreamUnreachable, open_upstream
from cortex.gateway.router import Resolved
from cortex.gateway.scheduler import Scheduler
from cortex.gateway.tally import Tally
from cortex.gateway.transport import Transport
from cortex.wire.errors import ApiError

NODE_HEADER = "x-cortex-node"
MODEL_HEADER = "x-cortex-model"


class Dispatcher:
    """See the module docstring."""

    def __init__(
        self,
        config: CortexConfig,
        scheduler: Scheduler,
        transport: Transport,
        metrics: GatewayMetrics,
        resolve: Callable[[str], Resolved],
    ) -> None:
        g = config.gateway
        self.config = config
        self.scheduler = scheduler
        self.transport = transport
        self.metrics = metrics
        self.resolve = resolve
        # Per-key limits (set by Gateway.install_keys when the gateway has keys).
        self.limits: Limits | None = None
        self.default_source: Callable[[], str] = lambda: ""
        self.retry_after = float(g.retry_after)
        self.ping_interval = g.stream_keepalive.seconds or 10.0
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=g.connect_timeout.seconds,
            sock_connect=g.connect_timeout.seconds,
            sock_read=g.idle_timeout.seconds,
        )

    async def serve(
        self,
        tally: Tally,
        requested: str,
        policy: AnswerPolicy,
        client_headers: Mapping[str, str],
    ) -> Response:
        """Serve one request for ``requested`` (a model name or alias) with ``policy``.

        Failures before a neuron answered raise :class:`ApiError` (the endpoint records them on
        ``tally``); once a neuron answered, the policy ends the tally, which gives the lease
        back. A neuron that could not be reached, or said the model is not there, before any
        byte was relayed is left for another node (:meth:`cortex.gateway.scheduler.Lease.reroute`).
        """
        resolved = self.resolve(requested)
        account = tally.account
        gateway_headers = {NODE_HEADER: "", MODEL_HEADER: resolved.canonical}
        if account is not None:
            limit_headers = self._admit(tally, account, requested, resolved, policy.queued)
            if limit_headers:
                tally.limit_headers = limit_headers
                gateway_headers.update(limit_headers)
        body = policy.body(resolved.canonical)
        # A client's key is for the gateway alone; the neuron gets the cluster token instead.
        headers = without_credentials(client_headers)
        lease = await self.scheduler.acquire(
            resolved, queued=policy.queued, key=account.name if account is not None else None
        )
        session = self.transport.session
        route = policy.upstream_route
        retry_after = self.retry_after
        overhead = self.metrics.overhead.labels(tally.route)
        while True:
            node = lease.node
            tally.bind(lease)
            overhead.observe(
                max(0.0, time.monotonic() - tally.started - lease.queue_wait - lease.load_wait)
            )
            try:
                resp = await open_upstream(
                    session, f"{node.endpoint}{route}", body, headers, self.timeout, retry_after
                )
            except UpstreamUnreachable as exc:
                tally.unbind()
                try:
                    moved = await lease.reroute(exc)
                except BaseException:
                    lease.release()
                    raise
                if moved:
                    continue
                lease.release()
                raise
            except BaseException as exc:  # the client left (cancelled) while it was sent
                tally.end("client_disconnected" if _cancelled(exc) else "internal_error")
                raise
            try:
                gateway_headers[NODE_HEADER] = node.name
                return await policy.answer(resp, tally, gateway_headers, retry_after)
            except ApiError as exc:
                tally.end(exc.code)  # a no-op when the policy ended it (it usually has)
                raise
            except BaseException as exc:
                resp.close()
                tally.end("client_disconnected" if _cancelled(exc) else "internal_error")
                raise

    def _admit(
        self, tally: Tally, account: KeyState, requested: str, resolved: Resolved, queued: bool
    ) -> dict[str, str]:
        """The key's checks (cortex.gateway.limits): may it use this model, and (for a
        generation: ``count_tokens`` spends nothing) is it within its rates and budget. The
        answer's rate-limit headers, or the 403/429 (counted per key and reason)."""
        limits = self.limits
        assert limits is not None
        try:
            limits.check_model(
                account,
                requested,
                resolved.canonical,
                self.default_source(),
                lambda name: self.resolve(name).canonical,
            )
            if not queued:
                return {}
            return limits.admit(account, tally.route.startswith("/v1/messages"))
        except LimitError as exc:
            self.metrics.key_limited.labels(account.name, exc.reason).inc()
            raise


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)
