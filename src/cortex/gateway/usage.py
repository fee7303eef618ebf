"""What the gateway itself knows that a poll cannot tell it yet.

The fleet view is up to one poll interval old; these counters are live. Routing reads in-flight
counts from here (a replica that just got a request is busier *now*), eviction never picks a
model with a request in flight here, models being unloaded are hidden from routing, and memory
reserved by loads in progress is not offered to a second load.
"""

from __future__ import annotations

import itertools
import time

import attrs

NodeModelKey = tuple[str, str]


@attrs.frozen
class Reservation:
    node: str
    device: str
    model_id: str
    bytes: int


@attrs.define
class Usage:
    in_flight: dict[NodeModelKey, int] = attrs.field(factory=dict)
    last_used: dict[NodeModelKey, float] = attrs.field(factory=dict)
    evicting: set[NodeModelKey] = attrs.field(factory=set)
    reservations: dict[int, Reservation] = attrs.field(factory=dict)
    _ids: itertools.count = attrs.field(factory=itertools.count)

    def begin(self, node: str, model_id: str) -> None:
        key = (node, model_id)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        self.last_used[key] = time.time()

    def end(self, node: str, model_id: str) -> None:
        key = (node, model_id)
        remaining = self.in_flight.get(key, 0) - 1
        if remaining > 0:
            self.in_flight[key] = remaining
        else:
            self.in_flight.pop(key, None)
        self.last_used[key] = time.time()

    def busy(self, node: str, model_id: str) -> int:
        return self.in_flight.get((node, model_id), 0)

    def node_busy(self, node: str) -> int:
        return sum(n for (name, _), n in self.in_flight.items() if name == node)

    def touch(self, node: str, model_id: str) -> None:
        self.last_used[(node, model_id)] = time.time()

    def reserve(self, node: str, device: str, model_id: str, size: int) -> int:
        token = next(self._ids)
        self.reservations[token] = Reservation(node, device, model_id, size)
        return token

    def release(self, token: int) -> None:
        self.reservations.pop(token, None)

    def reserved(self, node: str, device: str) -> int:
        return sum(
            r.bytes for r in self.reservations.values() if r.node == node and r.device == device
        )

    def loading_on(self, node: str) -> bool:
        return any(r.node == node for r in self.reservations.values())
