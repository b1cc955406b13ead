"""The runtime's error, importable without torch (the client names it in modules that must stay torch-free)."""


class ModelError(RuntimeError):
    """A model that cannot be used: not found, neither a masked nor a causal LM, or unlike what was expected."""
