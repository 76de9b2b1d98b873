"""What differs between the `transformers` releases fastcur supports (>= 4.45)."""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def cache_keyword(model_type: type) -> str:
    """The keyword a model's forward takes its KV cache by, and the name of the cache on its
    output: `cache` (transformers >= 5.25, where `past_key_values` is deprecated) or
    `past_key_values` (earlier releases)."""
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
