"""``cortex serve`` with every plugin installed never imports the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "llama_cpp", "huggingface_hub", "safetensors", "tokenizers")

SCRIPT = """
import json, sys
from cortex.cli import cortex_cli
from cortex.cli.common import add_plugin_commands
from cortex.cli.serve import load_configs
from cortex.config import CortexConfig, ModelsConfig
from cortex.gateway.app import create_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.plugins import get_registry

add_plugin_commands(cortex_cli.cli, "cortex")
registry = get_registry()
names = [p.name for p in registry.plugin_infos()]
harnesses = [h.name for h in registry.harnesses()]
sources = [s.name for s in registry.source_plugins()]
app = create_app(Gateway(CortexConfig(), ModelsConfig(), load_strategy("lru")))
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))
print(json.dumps({"plugins": names, "harnesses": harnesses, "sources": sources, "heavy": heavy}))
"""


def test_gateway_with_every_plugin_stays_light() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "harness-torch" in report["plugins"], report  # the plugins really were loaded
    assert {"echo", "torch"} <= set(report["harnesses"])
    assert report["heavy"] == [], f"cortex serve imported {report['heavy']}"
