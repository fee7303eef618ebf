"""Loads straight from the safetensors files: the same weights as transformers' own load, no
second copy on the host (peak RSS measured in a child process), and -- on a GPU -- a model whose
weights exceed the host memory the test allows still lands on the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cortex_harness_torch.harness import TorchHarness
from cortex_harness_torch.loading import _matches, place_weights, stored_dtype

from cortex.devices import cpu_device
from cortex.harness import LoadOptions

MiB = 1 << 20


def _saved_as(tiny_llama_dir: Path, out: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).write_bytes((tiny_llama_dir / name).read_bytes())
    return out


def _file_mapped(tensor) -> bool:  # type: ignore[no-untyped-def]
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip().endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return True
    return False


def test_stored_dtype_reads_the_headers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch

    assert stored_dtype(tiny_llama_dir) == torch.float32
    assert stored_dtype(_saved_as(tiny_llama_dir, tmp_path / "bf16", "bfloat16")) == torch.bfloat16
    assert stored_dtype(tmp_path) is None  # no safetensors at all


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_float32_checkpoint_on_cpu_is_not_copied(tiny_llama_dir: Path) -> None:
    """The parameters are views of the files' mappings: the page cache is the only copy."""
    model = TorchHarness().load(tiny_llama_dir, cpu_device(), LoadOptions())
    try:
        params = list(model.model.parameters())
        assert all(p.dtype.is_floating_point and p.device.type == "cpu" for p in params)
        assert all(_file_mapped(p) for p in params if p.numel() * p.element_size() >= 4096)
    finally:
        model.unload()


def test_a_bf16_checkpoint_on_cpu_computes_what_transformers_computes(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    snapshot = _saved_as(tiny_llama_dir, tmp_path / "bf16", "bfloat16")
    ours = TorchHarness().load(snapshot, cpu_device(), LoadOptions())
    try:
        reference = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
        assert {p.dtype for p in ours.model.parameters()} == {torch.float32}
        theirs = dict(reference.named_parameters())
        for name, param in ours.model.named_parameters():
            assert torch.equal(param, theirs[name]), name
        ids = torch.tensor([ours.tokenize("the river and the bridge")])
        with torch.no_grad():
            assert torch.equal(ours.model(ids).logits, reference(ids).logits)
    finally:
        ours.unload()


def test_placing_at_half_precision_matches_transformers(tiny_llama_dir: Path) -> None:
    """The path a GPU load takes (convert each tensor, release its pages), on the CPU: the same
    parameters as transformers' own bf16 load, none left behind in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    placed = place_weights(model, torch.device("cpu"), torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    theirs = dict(reference.named_parameters())
    assert placed.moved == len(theirs) and placed.kept == 0
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16, name
        assert torch.equal(param, theirs[name]), name
    their_buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():  # RoPE's inv_freq stays float32, as theirs
        assert buffer.dtype == their_buffers[name].dtype, name
        assert torch.equal(buffer, their_buffers[name]), name
    if sys.platform.startswith("linux"):
        assert placed.released_bytes > 0


def test_keep_in_fp32_patterns_match_whole_module_names() -> None:
    assert _matches("encoder.block.0.layer.1.DenseReluDense.wo.weight", ["wo"])
    assert _matches("model.layers.3.mlp.gate.weight", ["layers.*.mlp.gate"])
    assert not _matches("model.layers.3.mlp.wout.weight", ["wo"])
    assert not _matches("model.norm.weight", [])


# A child process measures a load: RSS before (imports warmed by a tiny load), the kernel's peak
# from there on (VmHWM, reset through /proc/self/clear_refs) and RSS after, with every weight
# touched once (as a first forward pass would).
_MEASURE = r"""
import json, re, sys, psutil, torch

def reset_peak():  # start the kernel's peak-RSS count (VmHWM) afresh
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def peak_rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
from pathlib import Path
from cortex.devices import cpu_device
from cortex.harness import LoadOptions
from cortex_harness_torch.harness import TorchHarness

harness, proc = TorchHarness(), psutil.Process()
harness.load(Path(sys.argv[1]), cpu_device(), LoadOptions()).unload()
base = proc.memory_info().rss
assert reset_peak()
model = harness.load(Path(sys.argv[2]), cpu_device(), LoadOptions())
with torch.no_grad():
    touched = sum(float(p.view(-1)[::1024].sum()) for p in model.model.parameters())
after = proc.memory_info().rss
peak = peak_rss()
print(json.dumps({"base": base, "peak": max(peak, base), "after": after,
                  "dtype": str(next(model.model.parameters()).dtype)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("shards", [1, 4])
def test_a_cpu_load_converting_bf16_holds_one_copy(
    shards: int, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """bf16 on disk, float32 on the CPU: peak RSS stays within 1.3x of what the model keeps
    (transformers' own conversion keeps every file mapped to the end: ~1.5x)."""
    from cortex.testing.sized_models import build_sized_model

    snapshot = build_sized_model(
        tmp_path / "model",
        target_bytes=48 * MiB,
        dtype="bfloat16",
        shard_bytes=16 * MiB if shards > 1 else None,
        tokenizer_dir=tiny_llama_dir,
    )
    assert len(list(snapshot.glob("*.safetensors"))) >= shards
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CORTEX_TORCH_CPU_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tiny_llama_dir), str(snapshot)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["dtype"] == "torch.float32"
    kept = figures["after"] - figures["base"]
    peak = figures["peak"] - figures["base"]
    assert kept >= 80 * MiB  # ~96 MB of float32 weights are resident
    assert peak <= 1.3 * kept, figures


# ---- GPU ---------------------------------------------------------------------------------------

# The child refuses to go past its host budget: a watchdog samples RSS every 2 ms and kills the
# process beyond it, and the kernel's exact peak (VmHWM) is checked afterwards as well.
_GPU_LOAD = r"""
import json, os, re, sys, threading, time, psutil, torch

def reset_peak():  # start the kernel's peak-RSS count (VmHWM) afresh
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def peak_rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
from pathlib import Path
from cortex.devices import cuda_devices
from cortex.harness import LoadOptions
from cortex_harness_torch.harness import TorchHarness

budget = int(sys.argv[3])
harness, proc, device = TorchHarness(), psutil.Process(), cuda_devices()[0]
harness.load(Path(sys.argv[1]), device, LoadOptions()).unload()  # imports, CUDA context
base = proc.memory_info().rss
assert reset_peak()
done = threading.Event()

def watchdog():
    while not done.is_set():
        if proc.memory_info().rss - base > budget:
            print(json.dumps({"killed_at": proc.memory_info().rss - base}), flush=True)
            os._exit(3)
        time.sleep(0.002)

threading.Thread(target=watchdog, daemon=True).start()
model = harness.load(Path(sys.argv[2]), device, LoadOptions())
done.set()
peak = peak_rss()
devices = {p.device.type for p in model.model.parameters()}
ids = torch.tensor([model.tokenize("the cat")], device=f"cuda:{device.index}")
with torch.no_grad():
    token = int(model.model(ids).logits[0, -1].argmax())
print(json.dumps({"base": base, "peak": peak, "devices": sorted(devices),
                  "token": token, "gpu_bytes": torch.cuda.memory_allocated(device.index)}))
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_a_load_larger_than_the_host_budget_lands_on_the_gpu(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """2 GiB of float32 weights in 8 shards, a host budget of 768 MiB for the load: the
    weights go to the GPU (as bf16/fp16) without ever being staged on the host."""
    from cortex.testing.sized_models import build_sized_model

    weights = 2 * 1024 * MiB
    budget = 768 * MiB
    snapshot = build_sized_model(
        tmp_path / "model",
        target_bytes=weights,
        dtype="float32",
        shard_bytes=256 * MiB,
        tokenizer_dir=tiny_llama_dir,
    )
    on_disk = sum(f.stat().st_size for f in snapshot.glob("*.safetensors"))
    assert on_disk > budget
    out = subprocess.run(
        [sys.executable, "-c", _GPU_LOAD, str(tiny_llama_dir), str(snapshot), str(budget)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["devices"] == ["cuda"]
    assert figures["peak"] - figures["base"] <= budget, figures
    assert figures["gpu_bytes"] >= on_disk // 2 * 0.9  # the whole model is on the device
