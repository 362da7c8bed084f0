"""What the application layer raises when a request cannot be carried out.

Every refusal is an ``AppError`` whose sentence names the value or row; ``status`` is the HTTP
answer the web gives (``web.app`` maps it; the admin pages flash the sentence). The CLI prints
"dicom-node: <sentence>" on one line and exits 1 for ``NotFound``, 2 otherwise
(``commands.refused``).
"""
from __future__ import annotations


class AppError(Exception):
    """A request the application layer refuses; ``str(exc)`` is the sentence shown."""

    status = 400


class NotFound(AppError, LookupError):
    """The row named does not exist; the sentence names it."""

    status = 404


class Conflict(AppError):
    """The row is in a state that does not allow the change; the sentence says which and why."""

    status = 409


class Invalid(AppError, ValueError):
    """A value is refused (an AE title, a port, an unknown destination, a runtime setting)."""

    status = 422


def invalid(exc, unnamed: str | None = None) -> Invalid:  # noqa: ANN001 - a pydantic ValidationError
    """A pydantic ``ValidationError`` as one ``Invalid`` sentence: "field: reason; ...";
    ``unnamed``: the field word for an error of the whole model (None: the reason alone)."""
    parts = []
    for e in exc.errors():
        field = ".".join(str(p) for p in e["loc"]) or unnamed
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}" if field else msg)
    return Invalid("; ".join(parts))


def validate(model, values: dict):  # noqa: ANN001 - a pydantic model class
    """``model`` validated from ``values``; a refusal as one ``Invalid`` (see ``invalid``)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise invalid(exc) from None
