"""``make dist`` builds a wheel and an sdist of each distribution that twine accepts, and the
wheels install into a fresh venv where ``cortex`` and ``neuron`` run and find every plugin.

The fresh venv gets cortex's own dependencies (from pip's cache and the local wheel folder) but
the harness plugins are installed ``--no-deps``: torch and llama-cpp-python would take minutes,
and the harnesses import them lazily, so the CLIs and plugin discovery work without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEEL_PREFIXES = (
    "cortex-",
    "cortex_source_huggingface-",
    "cortex_source_helexa-",
    "cortex_harness_torch-",
    "cortex_harness_llamacpp-",
    "cortex_harness_vllm-",
)
PLUGIN_ENTRY_POINTS = {
    "source-huggingface",
    "source-helexa",
    "harness-torch",
    "harness-llamacpp",
    "harness-vllm",
}


def clean_env() -> dict[str, str]:
    """The environment minus anything that would let the dev venv leak into the fresh one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.pop("CORTEX_PLUGINS", None)
    env["NO_COLOR"] = "1"
    return env


def run(args: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def one(files: list[Path], prefix: str, suffix: str) -> Path:
    matches = [f for f in files if f.name.startswith(prefix) and f.name.endswith(suffix)]
    # "cortex-" must not also match the plugins' "cortex_..." names.
    assert len(matches) == 1, f"expected one {prefix}*{suffix}, got {[m.name for m in matches]}"
    return matches[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_dist_then_install_wheels_into_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    bin_dir = Path(sys.executable).parent
    # -o: treat the dev venv as up to date (make dist depends on it; never rebuild it here).
    built = run(
        ["make", "-o", ".venv/.installed", "dist", f"DIST_DIR={dist}", f"BIN={bin_dir}"],
        cwd=ROOT,
        timeout=600,
    )
    files = sorted(dist.iterdir())
    assert len(files) == 12, [f.name for f in files]
    wheels = [one(files, prefix, ".whl") for prefix in WHEEL_PREFIXES]
    for prefix in WHEEL_PREFIXES:
        one(files, prefix, ".tar.gz")
    # twine prints one "Checking <file>: PASSED" per file (plugins without a README pass
    # "with warnings"); the output is wrapped to the terminal width, so count the verdicts.
    assert built.stdout.count("Checking ") == 12, built.stdout
    assert built.stdout.count("PASSED") == 12 and "FAILED" not in built.stdout, built.stdout

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
    core_and_sources = [w for w in wheels if "harness" not in w.name]
    harnesses = [w for w in wheels if "harness" in w.name]
    run([*pip, *core_and_sources], cwd=tmp_path, timeout=600)
    run([*pip, "--no-deps", *harnesses], cwd=tmp_path)

    # The example third-party plugin is a real distribution too: sdist, then the wheel from it
    # (nothing left in its folder), checked and installed alike.
    example_dist = tmp_path / "example"
    run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--outdir",
            example_dist,
            ROOT / "examples" / "cortex-source-local",
        ],
        cwd=tmp_path,
    )
    checked = run([sys.executable, "-m", "twine", "check", *example_dist.iterdir()], tmp_path)
    assert checked.stdout.count("PASSED") == 2, checked.stdout
    run([*pip, "--no-deps", *example_dist.glob("*.whl")], cwd=tmp_path)

    where = run([python, "-c", "import cortex; print(cortex.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout

    cortex_help = run([venv / "bin" / "cortex", "--help"], cwd=tmp_path).stdout
    assert "serve" in cortex_help and "plugins" in cortex_help
    neuron_help = run([venv / "bin" / "neuron", "--help"], cwd=tmp_path).stdout
    assert "plugins" in neuron_help

    listing = json.loads(run([venv / "bin" / "cortex", "plugins", "--json"], cwd=tmp_path).stdout)
    names = {p["name"] for p in listing["plugins"]}
    assert names >= PLUGIN_ENTRY_POINTS | {"source-local"}
    assert listing["broken"] == []

    # The plugin templates are package data: they must be inside the wheel.
    run(
        [
            venv / "bin" / "cortex",
            "plugin",
            "new",
            "smoke",
            "--kind",
            "eviction",
            "--dir",
            tmp_path,
        ],
        cwd=tmp_path,
    )
    assert (tmp_path / "cortex-eviction-smoke" / "src" / "cortex_eviction_smoke").is_dir()
