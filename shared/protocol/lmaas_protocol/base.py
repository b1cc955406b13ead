"""The base class of every wire model, and the error its validators raise."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Unknown fields are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class FieldError(ValueError):
    """A validation error that knows the dotted path of the bad parameter, relative to its model."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.reason = message


UNION_TAGS = frozenset({"tensor", "projected", "spec", "name"})  # tags of discriminated unions, not parameters


def error_param(error: dict) -> str:
    """Dotted parameter path of one pydantic error dict (``ValidationError.errors()`` item).

    Field validators report the field in `loc` and again at the start of their FieldError path; model
    validators report only the model's own location. Both end up as one path, e.g.
    ``candidates.0.soft_prompt.data``. A leading "body" (FastAPI's request-body prefix) is dropped.
    """
    loc: Sequence = [str(p) for p in error.get("loc", ()) if p not in UNION_TAGS]
    if loc and loc[0] == "body":
        loc = loc[1:]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        head = cause.param.split(".")[0]
        if loc and loc[-1] == head:
            loc = loc[:-1]
        loc = [*loc, cause.param]
    return ".".join(loc)


def error_message(error: dict) -> str:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return cause.reason
    return str(error.get("msg", "invalid value"))
