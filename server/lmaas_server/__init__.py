"""lmaas server: a frozen language model behind a forward-only HTTP API."""

__version__ = "0.1.0"
