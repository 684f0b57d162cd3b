"""Notices of third-party libraries that a user of imix2mix can do nothing about, kept off the console.

Only exact, known messages are dropped; every other warning of those libraries still shows.
Standard library only: call :func:`quiet_third_party_notices` before the libraries are imported
(the CLI's ``main`` and each Ray ``EditWorker`` do).
"""

from __future__ import annotations

import logging

# (logger name, text in the message): why it cannot be acted on
_NOTICES = (
    # diffusers' pipelines import CLIPImageProcessor; without torchvision (no CPU wheel here, not needed)
    # transformers falls back to the PIL processor, which is what we want.
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
)


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party_notices() -> None:
    """Drop the known unactionable notices (idempotent)."""
    for name, text in _NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropNotice) and existing.text == text for existing in logger.filters):
            logger.addFilter(_DropNotice(text))
