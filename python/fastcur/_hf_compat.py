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


def new_cache(config):
    """An empty DynamicCache for a model of `config`. Passing one in (rather than letting the
    model make it) keeps the cache object on the output: releases before 5 convert a cache they
    made themselves to the legacy tuple format, which has no batch_select_indices."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()
