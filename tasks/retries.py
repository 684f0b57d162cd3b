"""When Prefect should retry a task: storage hiccups yes; bad input or engine errors, which would fail again, no."""

from __future__ import annotations

from typing import Any

from imix2mix.errors import ImixError


def retry_on_storage_errors(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry ``OSError`` (network file systems, object stores) only."""
    try:
        state.result()
    except ImixError:
        return False
    except OSError:
        return True
    except Exception:  # noqa: BLE001 (anything else is not transient)
        return False
    return False
