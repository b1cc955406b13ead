"""torch and transformers are imported where they are used, never when a module of this package is imported:
the client names runtime modules (e.g. its errors) in code that must run without torch, and start-up of a
process that never touches the model stays light."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def inference_mode(fn: F) -> F:
    """`torch.inference_mode()` as a decorator that imports torch on the first call, not at import time."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
