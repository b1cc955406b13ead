"""Memory sizes known before any work: a prefix cache's bytes, a batch's token budget from a device's free
memory, and whether an error is an accelerator running out of memory.

Estimates come from the model config alone (no forward pass), so a server can refuse or size work before it
allocates anything: the keys/values of one cached prefix token take `layers x 2 x kv_heads x head_dim`
values, exactly what `prefix.compute_prefix` keeps per (right-padded) position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CPU_BATCH_TOKENS = 16384  # padded tokens per forward pass on a CPU: larger batches gain nothing there
MIN_BATCH_TOKENS, MAX_BATCH_TOKENS = 1024, 1 << 18  # bounds of the token budget derived from free memory
FREE_MEMORY_SHARE = 0.5  # of the free device memory after loading, the share one forward pass may take


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Bytes of one token's keys and values over all layers ([layers, 2, kv_heads, head_dim] values)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers) * 2 * kv_heads * head_dim * element_size


def prefix_bytes(config: Any, element_size: int, rows: int, width: int) -> int:
    """Bytes of the keys/values `compute_prefix` keeps for `rows` prefixes right-padded to `width` tokens."""
    return kv_bytes_per_token(config, element_size) * rows * width


def activation_bytes_per_token(config: Any, element_size: int) -> int:
    """A rough upper bound of one computed token's live activations in a forward pass: a layer's hidden
    states, attention projections and MLP (~12 x hidden + 3 x intermediate values), plus its keys/values
    kept for every layer (the prefix-cache path holds a cache)."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return (12 * hidden + 3 * intermediate) * element_size + kv_bytes_per_token(config, element_size)


def context_weight(config: Any, element_size: int) -> float:
    """What one cached prefix position costs a batch, in computed tokens: its gathered keys/values for every
    layer against a computed token's activations (`rows.batches`)."""
    return kv_bytes_per_token(config, element_size) / activation_bytes_per_token(config, element_size)


def batch_tokens_for(config: Any, element_size: int, free_bytes: int) -> int:
    """Padded tokens per forward pass that fit in `FREE_MEMORY_SHARE` of `free_bytes`, within bounds."""
    tokens = int(free_bytes * FREE_MEMORY_SHARE) // activation_bytes_per_token(config, element_size)
    return max(MIN_BATCH_TOKENS, min(MAX_BATCH_TOKENS, tokens))


def free_bytes(devices: set[torch.device]) -> int | None:
    """The smallest free memory among the CUDA devices in `devices` (None: none of them is a CUDA device)."""
    import torch

    free = [torch.cuda.mem_get_info(d)[0] for d in devices if d.type == "cuda"]
    return min(free) if free else None


def default_batch_tokens(model: torch.nn.Module) -> int:
    """`CPU_BATCH_TOKENS` on a CPU; on CUDA, what the free memory left after loading allows."""
    devices = {p.device for p in model.parameters()}
    free = free_bytes(devices)
    if free is None:
        return CPU_BATCH_TOKENS
    element_size = next(model.parameters()).element_size()
    return batch_tokens_for(model.config, element_size, free)


def is_out_of_memory(error: BaseException) -> bool:
    """An accelerator's out-of-memory error (CUDA's, or a backend's RuntimeError saying so)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is the same class
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory() -> None:
    """Hand the allocator's cached blocks back after an out-of-memory error, before a smaller retry."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
