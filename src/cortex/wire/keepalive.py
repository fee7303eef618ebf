"""Idle keep-alive timeouts on the gateway -> neuron hop, and why their order matters.

The gateway keeps connections to neurons open between requests (a new TCP connection per
request would cost more than the rest of the proxy hop). Either side may close an idle one;
if the *neuron* closes first, the gateway can pick the connection from its pool in the
instant the neuron's FIN is on the wire but not yet read, and the request dies with "Server
disconnected" / "Can not write request body". uvicorn closes after 5 s by default and
aiohttp's pool keeps connections 15 s, so with the defaults that race was live: the gateway
benchmark hit it in a full run (a 502 on a stream). So the gateway lets go first, always: the neuron
waits well past the gateway's pool timeout. (The gateway also sends a request once more on
another connection when it hits the race anyway, e.g. a neuron that does not run this code.)
"""

from __future__ import annotations

# aiohttp's own default; how long the gateway keeps an idle neuron connection for reuse.
GATEWAY_UPSTREAM_KEEPALIVE_S = 15.0
# How long `neuron run` keeps an idle client connection open (uvicorn's default is 5 s).
NEURON_KEEPALIVE_S = 75
