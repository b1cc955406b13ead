"""The engine room: API requests to rows (inputs store, candidate decoding), the batching scheduler, and the
calls into the frozen-LM runtime (`lmaas_runtime`) that run them."""

from lmaas_server.engine.engine import Engine

__all__ = ["Engine"]
