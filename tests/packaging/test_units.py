"""The systemd units in deploy/: what an operator relies on is there, systemd accepts them, the
hardening holds, and the command lines they run are ones our programs accept.

``systemd-analyze verify`` insists that ExecStart's binary exists, so it checks copies whose
``/opt/cortex/venv/bin/`` prefix points at this test venv's ``bin/`` instead; everything else in
the unit is verified as shipped.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL_BIN = "/opt/cortex/venv/bin/"
UNITS = {
    "cortex.service": ("cortex", ["serve", "-c", "/etc/cortex/cortex.toml"], "cortex.env"),
    "neuron.service": ("neuron", ["run", "-c", "/etc/cortex/neuron.toml"], "neuron.env"),
}
# systemd-analyze security's exposure score (0 = locked down, 10 = unprotected). The neuron
# scores worse because it needs the GPU device nodes and run-time code generation.
MAX_EXPOSURE = {"cortex.service": 2.0, "neuron.service": 4.0}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> (key, value) pairs in order; systemd allows repeated keys, configparser
    does not, hence this small parser."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}: expected one value, got {found}"
    return found[0]


def load(name: str) -> Unit:
    return parse_unit((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_runs_the_program_as_a_dedicated_user_and_restarts(name: str) -> None:
    program, args, env_file = UNITS[name]
    unit = load(name)
    assert value(unit, "Service", "User") == "cortex"
    assert value(unit, "Service", "Group") == "cortex"
    assert value(unit, "Service", "Restart") == "on-failure"
    assert shlex.split(value(unit, "Service", "ExecStart")) == [INSTALL_BIN + program, *args]
    assert value(unit, "Service", "EnvironmentFile") == f"-/etc/cortex/{env_file}"
    assert value(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in value(unit, "Unit", "After")
    assert (DEPLOY / f"{env_file}.example").is_file()


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_is_hardened(name: str) -> None:
    unit = load(name)
    for key, expected in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelModules": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert value(unit, "Service", key) == expected, key


def test_neuron_can_reach_the_gpu_and_write_its_caches() -> None:
    unit = load("neuron.service")
    assert values(unit, "Service", "PrivateDevices") in ([], ["no"])
    assert values(unit, "Service", "DevicePolicy") in ([], ["auto"])
    assert values(unit, "Service", "MemoryDenyWriteExecute") in ([], ["no"])
    assert value(unit, "Service", "CacheDirectory") == "cortex"
    assert "/var/cache/cortex" in value(unit, "Service", "ReadWritePaths").split()
    env = dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))
    assert env["HF_HOME"].startswith("/var/cache/cortex/")
    assert env["CORTEX_CACHE"] == "/var/cache/cortex"


def test_gateway_has_no_device_access() -> None:
    assert value(load("cortex.service"), "Service", "PrivateDevices") == "yes"


def test_sysusers_creates_the_service_user() -> None:
    lines = [
        line.split()
        for line in (DEPLOY / "cortex.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0][:3] == ["u", "cortex", "-"]


def runnable_copy(name: str, directory: Path) -> Path:
    """The unit with ExecStart pointing at this venv's programs (they must exist for verify)."""
    text = (DEPLOY / name).read_text()
    assert INSTALL_BIN in text
    copy = directory / name
    copy.write_text(text.replace(INSTALL_BIN, str(Path(sys.executable).parent) + "/"))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    copies = [runnable_copy(name, tmp_path) for name in sorted(UNITS)]
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *map(str, copies)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even for unknown keys and unparsable values; it only warns. Any output
    # is a mistake in a unit.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_security_exposure_is_low(name: str, tmp_path: Path) -> None:
    copy = runnable_copy(name, tmp_path)
    threshold = int(MAX_EXPOSURE[name] * 10)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", f"--threshold={threshold}", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


@pytest.mark.parametrize("name", sorted(UNITS))
def test_exec_start_reads_the_config_it_is_given(name: str, tmp_path: Path) -> None:
    """Run the unit's command line with the config path swapped for a file holding an unknown
    key: the program must get as far as loading it and refuse it by name, which proves the
    subcommand and ``-c`` exist, without starting a server."""
    program, args, _ = UNITS[name]
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("no_such_key = 1\n")
    command = [str(Path(sys.executable).parent / program), *args[:-1], str(bad_config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no_such_key" in result.stderr, result.stderr
    assert "No such command" not in result.stderr and "No such option" not in result.stderr
