"""Errors that name the offending field, so every surface (CLI, status, Events) can say where."""

from __future__ import annotations

from pydantic import ValidationError


class SpecError(ValueError):
    """A spec the schema accepts but that cannot be served as written (unknown model, TP not dividing
    heads, EP on a dense model...). ``field`` is the JSON path, e.g. ``spec.parallelism.tensor``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class FieldValueError(ValueError):
    """Raised by a cross-field (model) validator for the field it is about: pydantic would name only
    the model, the API server's CEL rule names ``fieldPath``; spec_error appends ``field`` so that
    the CLI, status and the API server say the same path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith("function-after") or part in ("int", "literal['auto']", "str"):
            continue  # pydantic's union-branch tags are noise to a user
        else:
            path += f".{part}" if path else part
    return path


def spec_error(err: ValidationError, prefix: str = "spec") -> SpecError:
    """A SpecError for the first bad field, e.g. ``spec.model.dtype: Input should be 'bf16', ... (got 'bf17')``."""
    errors = err.errors(include_url=False)
    first = errors[0]
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = _loc(prefix, tuple(first["loc"]))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldValueError):
        where = f"{where}.{cause.field}" if where else cause.field
    got = first.get("input")
    tail = ""
    if first["type"] not in ("missing",) and not isinstance(got, dict | list) and got is not None:
        tail = f" (got {got!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return SpecError(where, f"{msg}{tail}{more}")
