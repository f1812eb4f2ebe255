"""Name -> attention class registry (one place to add a variant; models look names up here)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

ATTENTION_REGISTRY: dict[str, type[nn.Module]] = {}

T = TypeVar("T", bound=type[nn.Module])


def register_attention(name: str) -> Callable[[T], T]:
    """Class decorator: make an attention mechanism available under `name`."""

    def decorate(cls: T) -> T:
        if name in ATTENTION_REGISTRY:
            raise ValueError(f"attention {name!r} is already registered")
        ATTENTION_REGISTRY[name] = cls
        return cls

    return decorate


def create_attention(name: str, dim: int, num_heads: int, **options: Any) -> nn.Module:
    """Instantiate the attention registered under `name`, passing it the options it takes
    (the others belong to other mechanisms and are dropped)."""
    try:
        cls = ATTENTION_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(ATTENTION_REGISTRY))
        raise ValueError(f"unknown attention {name!r}; known: {known}") from None
    accepted = inspect.signature(cls).parameters
    return cls(dim, num_heads, **{k: v for k, v in options.items() if k in accepted})
