"""Plain fleet views (no servers) for tests of routing, catalogue and eviction decisions."""

from __future__ import annotations

from cortex.gateway.nodes import Discovery, Health, NodeDevice, NodeModel, NodeState

MIB = 2**20


def node(
    name: str,
    *models: NodeModel,
    up: bool = True,
    gpus: tuple[int, ...] = (),
    cpu_mb: int = 1024,
    harnesses: tuple[str, ...] = ("echo", "torch"),
    sources: tuple[str, ...] = ("huggingface",),
) -> NodeState:
    devices = [NodeDevice(f"cuda:{i}", "cuda", mb * MIB, mb * MIB) for i, mb in enumerate(gpus)]
    devices.append(NodeDevice("cpu", "cpu", cpu_mb * MIB, cpu_mb * MIB))
    health = Health()
    if up:
        health.record_success()
    return NodeState(
        name=name,
        endpoint=f"http://{name}.invalid",
        health=health,
        discovery=Discovery(name, "huggingface", tuple(devices), harnesses, sources),
        models=models,
    )


def model(
    model_id: str,
    mb: int = 100,
    state: str = "ready",
    device: str = "cpu",
    last_used: float = 0.0,
    in_flight: int = 0,
    max_batch: int = 1,
    waiting: int = 0,
) -> NodeModel:
    return NodeModel(
        id=model_id if ":" in model_id else f"huggingface:{model_id}",
        state=state,
        device=device,
        memory_bytes=mb * MIB,
        last_used=last_used,
        in_flight=in_flight,
        max_batch=max_batch,
        waiting=waiting,
    )
