"""The CLI's commands: thin callers of the application layer (``dicom_node.app``) for every change."""
from __future__ import annotations

import sys


def refused(exc: Exception) -> int:
    """Print an application-layer refusal (``app.errors.AppError``) as one line; the exit status:
    1 for ``NotFound``, 2 for ``Conflict`` and ``Invalid``."""
    from dicom_node.app.errors import NotFound

    print(f"dicom-node: {exc}", file=sys.stderr)
    return 1 if isinstance(exc, NotFound) else 2
