"""``python -m cortex.cli cortex ...`` / ``python -m cortex.cli neuron ...`` (used by tests)."""

import sys

from cortex.cli import cortex_cli, neuron_cli

if __name__ == "__main__":
    program = sys.argv.pop(1) if len(sys.argv) > 1 else "cortex"
    sys.argv[0] = program
    (neuron_cli if program == "neuron" else cortex_cli).main()
