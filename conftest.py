"""Root conftest: shared fixtures for core and every plugin's tests, and hypothesis profiles.

``make test`` must give the same answer on every run, so hypothesis (and schemathesis, which
generates through it) runs derandomized there: a fixed seed per test, no example database. An
example a fuzz run finds is kept as an explicit case next to the test it broke. ``make fuzz``
selects the ``fuzz`` profile instead: random seeds, ``CORTEX_FUZZ_SCALE`` times the examples
(see :func:`cortex.testing.fuzz.examples`), run in rounds for ``FUZZ_SECONDS``.
"""

import os
import tempfile

from hypothesis import settings

# Gateways with keys keep usage in a SQLite file in the state directory (docs/operators.md):
# tests (and the gateways they start as processes) write theirs to a fresh folder, never to the
# home directory of whoever runs them.
os.environ.setdefault("CORTEX_STATE_DIR", tempfile.mkdtemp(prefix="cortex-test-state-"))

pytest_plugins = ["cortex.testing.fixtures"]

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("CORTEX_HYPOTHESIS_PROFILE", "ci"))
