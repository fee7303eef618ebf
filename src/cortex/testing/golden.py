"""Golden files for tests: JSON inputs with the expected output stored beside them.

Run pytest with ``CORTEX_UPDATE_GOLDEN=1`` to (re)write the expected parts after a deliberate
change, then review the diff before committing: the files are the specification.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def updating() -> bool:
    return os.environ.get("CORTEX_UPDATE_GOLDEN") == "1"


def golden_cases(folder: Path) -> list[Path]:
    """The case files of a golden folder, sorted (use as pytest parameters)."""
    return sorted(folder.glob("*.json"))


def load_case(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def check_golden(path: Path, case: dict[str, Any], key: str, actual: Any) -> None:
    """Assert ``actual == case[key]``, or store ``actual`` there in update mode."""
    actual = json.loads(json.dumps(actual))  # compare as JSON would store it (tuples -> lists)
    if updating():
        case[key] = actual
        path.write_text(json.dumps(case, indent=2, ensure_ascii=False) + "\n")
        return
    assert key in case, f"{path.name} has no {key!r}: run with CORTEX_UPDATE_GOLDEN=1"
    assert actual == case[key], f"{path.name}: {key} differs from the golden file"
