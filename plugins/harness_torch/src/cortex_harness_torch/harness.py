"""The transformers harness: safetensors repos with a ``config.json``, on CPU and CUDA.

Loads only from the fetched local snapshot (``local_files_only``): a neuron never lets
transformers talk to a hub. On CUDA the weights are bf16 where the device supports it, else fp16;
on CPU float32 (half precision matmuls on CPU are slow and some ops are missing). Weights go
straight from the safetensors files to the device, one tensor at a time (loading.py): a GPU load
never stages the model in host memory, and a CPU load never holds two copies of it.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

import attrs

from cortex.devices import Device
from cortex.harness import DeviceOutOfMemory, HarnessError, LoadedModel, LoadOptions
from cortex.source import Preflight, WeightFormat
from cortex_harness_torch.batched import serve_model
from cortex_harness_torch.embedding import EMBEDDING_FILES, is_embedding_repo, load_embedding_model
from cortex_harness_torch.loading import place_weights, stored_dtype
from cortex_harness_torch.memory import estimate_bytes
from cortex_harness_torch.model import classify_torch_error, release_device_cache

log = logging.getLogger(__name__)

_NEEDED_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken")


def torch_device_of(device: Device) -> Any:
    import torch

    if device.kind == "cpu":
        return torch.device("cpu")
    if device.kind == "cuda":
        return torch.device("cuda", device.index)
    raise HarnessError(f"the torch harness cannot load onto a {device.kind!r} device")


def dtype_for(device: Device) -> Any:
    """float32 on CPU; bf16 on CUDA devices that support it, else fp16."""
    import torch

    if device.kind == "cpu":
        return torch.float32
    with torch.cuda.device(device.index):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


CPU_THREADS_ENV = "CORTEX_TORCH_CPU_THREADS"


def cpu_threads(environ: dict[str, str] | None = None) -> int:
    """Intra-op threads for CPU models: ``$CORTEX_TORCH_CPU_THREADS``, else one less than the
    CPUs this process may use. The neuron's event loop needs a core too: when torch's threads
    take every core, each step's parallel region waits for the busy one to be scheduled, and
    on a 2-core machine a tiny model decoded 17 tokens/s instead of 180."""
    value = (environ if environ is not None else os.environ).get(CPU_THREADS_ENV, "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, available - 1)


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


def context_length_of(config: dict[str, Any], requested: int | None) -> int:
    """The model's context (``max_position_embeddings``), lowered to what the load asked for."""
    native = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and text_config.get("max_position_embeddings"):
        native = text_config["max_position_embeddings"]
    return int(min(native, requested)) if requested else int(native)


@attrs.frozen
class TorchHarness:
    name: str = "torch"

    def accepts(self, preflight: Preflight) -> bool:
        return "config.json" in preflight.file_names() and preflight.weight_format in (
            WeightFormat.SAFETENSORS,
            WeightFormat.SAFETENSORS_SHARDED,
            WeightFormat.BOTH,
        )

    def files_needed(self, preflight: Preflight) -> list[str]:
        """The top-level config, weights and tokenizer files, and an embedding repo's
        sentence-transformers layout (its pooling lives in a folder)."""
        names = preflight.file_names()
        top = [f for f in names if f.endswith(_NEEDED_SUFFIXES) and "/" not in f]
        return top + [f for f in EMBEDDING_FILES if f in names and f not in top]

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        """Weights at the dtype of the target device, the KV cache of the load's batching
        capacity and saved prefixes, and headroom.
        Reads the repo's ``config.json`` from ``options.extra["config"]`` when the neuron
        fetched it first (it does when the repo has one); without it, assumes 16-bit weights."""
        weights = sum(
            preflight.size_of(f) for f in preflight.file_names() if f.endswith(".safetensors")
        )
        config = options.extra.get("config")
        if is_embedding_repo(preflight.file_names(), config if isinstance(config, dict) else None):
            # no KV cache: the weights at the target dtype and the same headroom
            return estimate_bytes(weights, config, options.device_kind or "cpu", None, kv_tokens=0)
        return estimate_bytes(
            weights,
            config if isinstance(config, dict) else None,
            options.device_kind or "cpu",
            options.context_length,
            max_batch=options.max_batch,
            kv_tokens=options.kv_tokens,
        )

    def load(self, snapshot: Path, device: Device, options: LoadOptions) -> LoadedModel:
        snapshot = Path(snapshot)
        config = read_config(snapshot)
        torch_device = torch_device_of(device)
        try:
            return self._load(snapshot, device, torch_device, config, options)
        except HarnessError:
            release_device_cache(torch_device)
            raise
        except Exception as exc:
            # a device error keeps its meaning (poison or retry later); anything else
            # (corrupt safetensors, unknown architecture, bad tokenizer) is a bad repo
            release_device_cache(torch_device)
            mapped = classify_torch_error(exc)
            if mapped is exc:
                mapped = HarnessError(
                    f"transformers could not load {snapshot.name}: {type(exc).__name__}: {exc}"
                )
            raise mapped from exc

    def _load(
        self,
        snapshot: Path,
        device: Device,
        torch_device: Any,
        config: dict[str, Any],
        options: LoadOptions,
    ) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = dtype_for(device)
        if device.kind == "cpu":
            import torch

            threads = cpu_threads()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(snapshot, local_files_only=True)
        if is_embedding_repo([p.name for p in snapshot.iterdir()], config):
            context = context_length_of(config, options.context_length)
            log.info("loading %s on %s as an embedding model", snapshot.name, torch_device)
            return load_embedding_model(snapshot, torch_device, dtype, context, tokenizer)
        # At the dtype the weights are stored in, transformers makes every parameter a view of
        # its file's mapping; place_weights then moves them to the device and dtype one tensor
        # at a time (loading.py: peak host memory = the model as it stays + about one tensor).
        model = AutoModelForCausalLM.from_pretrained(
            snapshot,
            dtype=stored_dtype(snapshot) or dtype,
            local_files_only=True,
            trust_remote_code=False,
        )
        try:
            placed = place_weights(model, torch_device, dtype)
        except Exception as exc:
            mapped = classify_torch_error(exc)
            del model  # and the frames that hold it: the device memory goes back at once
            traceback.clear_frames(exc.__traceback__)
            if isinstance(mapped, DeviceOutOfMemory):
                raise mapped from exc
            raise
        log.debug(
            "%s: %d tensors placed, %d kept as file views, %.0f MB of source pages released",
            snapshot.name,
            placed.moved,
            placed.kept,
            placed.released_bytes / 2**20,
        )
        model.eval()
        context = context_length_of(config, options.context_length)
        log.info("loaded %s on %s as %s (context %d)", snapshot.name, torch_device, dtype, context)
        return serve_model(model, tokenizer, torch_device, context, options)
