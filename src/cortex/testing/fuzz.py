"""How many examples a property-based test draws: its CI budget, or more under ``make fuzz``.

``make test`` runs every hypothesis test derandomized with the budget written at the test
(the root ``conftest.py`` loads the ``ci`` profile); ``make fuzz`` sets
``CORTEX_HYPOTHESIS_PROFILE=fuzz`` and ``CORTEX_FUZZ_SCALE`` so the same tests draw random,
many more examples.
"""

from __future__ import annotations

import os


def examples(budget: int) -> int:
    """``budget`` in CI; ``budget * CORTEX_FUZZ_SCALE`` under ``make fuzz``."""
    if os.environ.get("CORTEX_HYPOTHESIS_PROFILE") != "fuzz":
        return budget
    try:
        scale = max(1, int(os.environ.get("CORTEX_FUZZ_SCALE", "10")))
    except ValueError:
        scale = 10
    return budget * scale
