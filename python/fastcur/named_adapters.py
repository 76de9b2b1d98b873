"""Named adapters, PEFT's names: several adapters (of any methods) on one model, one active.

    fastcur.inject(model, fastcur.LoRAConfig(rank=8), adapter_name="task1")
    fastcur.inject(model, fastcur.CURLoRAConfig(rank=8), adapter_name="task2")   # now active
    fastcur.set_adapter(model, "task1")
    fastcur.active_adapter(model)          # "task1"
    fastcur.delete_adapter(model, "task2")

How: the model's module tree holds only the active adapter's layers (and its
`modules_to_save` copies), exactly as a single injected adapter does, so state-dict names,
PEFT interop, torch.compile, FSDP2 and every tool that walks the modules (LaplaceRegularizer,
IMSM) see one adapter. The others wait in an `AdapterStore` kept on the model as a plain
attribute (not a submodule): they cost nothing in the forward and are not in
`model.parameters()`, `state_dict()` or an optimizer. Every adapter layer on one module shares
that module's frozen weight (the same Parameter; a transformers Conv1D base gives each adapter
its own [out, in] copy). `set_adapter` swaps modules in place; it refuses while the active
adapter is merged (the merged update sits in the shared weight).

`model.to(...)` moves only the active adapter; `set_adapter` moves the adapter it switches to
onto the device (and floating dtype) of the weights it sits on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import AdapterConfig
from .modules.adapter_linear import AdapterLinear

STORE_ATTR = "_fastcur_adapters"
DEFAULT_ADAPTER = "default"


@dataclass
class NamedAdapter:
    """One named adapter: its config (None for adapters built by hand), its layers
    {qualified name: AdapterLinear} and its trainable copies of `modules_to_save`
    {qualified name: module}."""
    config: AdapterConfig | None
    layers: dict[str, AdapterLinear]
    saved: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class AdapterStore:
    """Every adapter of a model: `bases` {qualified name: the original module there} for each
    name any adapter replaces, `adapters` {adapter name: NamedAdapter}, `active` (a name or
    None: the base modules are shown)."""
    bases: dict[str, nn.Module] = field(default_factory=dict)
    adapters: dict[str, NamedAdapter] = field(default_factory=dict)
    active: str | None = None

    def module_at(self, name: str, adapter: str | None) -> nn.Module:
        held = self.adapters[adapter] if adapter is not None else None
        if held is not None and name in held.layers:
            return held.layers[name]
        if held is not None and name in held.saved:
            return held.saved[name]
        return self.bases[name]


def check_adapter_name(adapter_name, caller: str) -> str:
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name != adapter_name.strip():
        raise ValueError(f"{caller}: adapter_name must be a non-empty str without surrounding spaces, "
                         f"got {adapter_name!r}")
    return adapter_name


def store_of(model: nn.Module) -> AdapterStore | None:
    """The model's AdapterStore; adapter layers put in without `inject` (by hand,
    `load_peft_adapter`, an older fastcur) are adopted as the adapter "default"."""
    from .inject import CONFIG_ATTR, _plain_linear, adapter_modules
    store = vars(model).get(STORE_ATTR)
    layers = adapter_modules(model)
    if store is not None and (store.active is None or _current(store, layers)):
        return store
    # no store, or one that code outside fastcur's API (IncLoRA's task switch) made stale by
    # swapping modules itself: describe what the model holds now
    vars(model).pop(STORE_ATTR, None)
    if not layers:
        return None
    store = AdapterStore()
    for name, layer in layers.items():
        store.bases[name] = _plain_linear(layer)
    store.adapters[DEFAULT_ADAPTER] = NamedAdapter(getattr(model, CONFIG_ATTR, None), dict(layers))
    store.active = DEFAULT_ADAPTER
    vars(model)[STORE_ATTR] = store
    return store


def _current(store: AdapterStore, layers: dict[str, AdapterLinear]) -> bool:
    """Whether the model's adapter layers `layers` are exactly the active adapter's."""
    held = store.adapters[store.active].layers
    return held.keys() == layers.keys() and all(held[n] is layers[n] for n in held)


def show(model: nn.Module, store: AdapterStore, adapter: str | None) -> None:
    """Put `adapter`'s modules (None: the base modules) into the model's tree."""
    from .inject import CONFIG_ATTR, _set_module
    for name in store.bases:
        _set_module(model, name, store.module_at(name, adapter))
    store.active = adapter
    config = store.adapters[adapter].config if adapter is not None else None
    if config is not None:
        setattr(model, CONFIG_ATTR, config)
    elif CONFIG_ATTR in vars(model):
        delattr(model, CONFIG_ATTR)


def add(model: nn.Module, adapter_name: str, config: AdapterConfig | None, layers: dict[str, AdapterLinear],
        saved: dict[str, nn.Module]) -> None:
    """Register a new adapter whose modules were built on the base view (`show(model, store,
    None)` or a model without adapters) and make it active; freezes everything but it."""
    from .inject import freeze_base
    store = store_of(model) or AdapterStore()
    vars(model)[STORE_ATTR] = store
    for name in (*layers, *saved):
        if name not in store.bases:
            store.bases[name] = model.get_submodule(name)
    for name in saved:
        store.bases[name].requires_grad_(False)      # the original is the frozen base's
    store.adapters[adapter_name] = NamedAdapter(config, dict(layers), dict(saved))
    show(model, store, adapter_name)
    freeze_base(model)


def forget(model: nn.Module) -> None:
    """Drop the store (after unload / merge_and_unload)."""
    vars(model).pop(STORE_ATTR, None)


def check_unmerged(store: AdapterStore, caller: str) -> None:
    if store.active is None:
        return
    merged = [n for n, m in store.adapters[store.active].layers.items() if m.merged]
    if merged:
        raise ValueError(f"{caller}: the active adapter {store.active!r} is merged into the weights its "
                         f"layers share with the other adapters (module(s) {', '.join(merged[:4])}); "
                         f"call fastcur.unmerge(model) first")


def _check_not_sharded(store: AdapterStore, caller: str) -> None:
    for layer in (store.adapters[store.active].layers.values() if store.active else ()):
        if callable(getattr(layer.weight, "full_tensor", None)):
            raise ValueError(f"{caller}: the model is sharded (FSDP2 DTensor weights); switching adapters "
                             f"would put unsharded tensors into it: set the adapter before fully_shard")
        break


@torch.no_grad()
def _rehome(adapter: NamedAdapter, store: AdapterStore) -> None:
    """Move an adapter to the device and floating dtype of the base modules it sits on (the
    model may have been moved while it waited)."""
    for name, module in (*adapter.layers.items(), *adapter.saved.items()):
        ref = next(iter(store.bases[name].parameters()), None)
        if ref is None:
            continue
        wrong = any(t.device != ref.device or (t.is_floating_point() and t.dtype != ref.dtype)
                    for t in (*module.parameters(), *module.buffers()))
        if wrong:
            module.to(device=ref.device, dtype=ref.dtype)


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the active adapter of `model` (the only one that runs and trains:
    its trainable tensors keep their requires_grad); returns `model`."""
    from .inject import unwrap
    caller = "fastcur.set_adapter"
    model = _model_or_raise(model, caller)
    inner = unwrap(model)
    store = _store_or_raise(inner, caller)
    _known_or_raise(store, adapter_name, caller)
    if store.active == adapter_name:
        return model
    check_unmerged(store, caller)
    _check_not_sharded(store, caller)
    _rehome(store.adapters[adapter_name], store)
    show(inner, store, adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove `adapter_name` from `model`. Deleting the active adapter activates the first
    remaining one; deleting the last one gives the base model back (as `fastcur.unload`)."""
    from .inject import unload, unwrap
    caller = "fastcur.delete_adapter"
    model = _model_or_raise(model, caller)
    inner = unwrap(model)
    store = _store_or_raise(inner, caller)
    _known_or_raise(store, adapter_name, caller)
    if len(store.adapters) == 1:
        unload(inner)
        return model
    if store.active == adapter_name:
        check_unmerged(store, caller)
        set_adapter(inner, next(n for n in store.adapters if n != adapter_name))
    del store.adapters[adapter_name]
    used = {n for a in store.adapters.values() for n in (*a.layers, *a.saved)}
    for name in [n for n in store.bases if n not in used]:
        del store.bases[name]            # its base module is in place already (the adapter was inactive)
    return model


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter of `model` (None when it holds no fastcur adapter)."""
    from .inject import unwrap
    store = store_of(unwrap(_model_or_raise(model, "fastcur.active_adapter")))
    return store.active if store is not None else None


def adapter_names(model: nn.Module) -> list[str]:
    """The names of every adapter of `model`, in the order they were added."""
    from .inject import unwrap
    store = store_of(unwrap(_model_or_raise(model, "fastcur.adapter_names")))
    return list(store.adapters) if store is not None else []


def _model_or_raise(model, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    return model


def _store_or_raise(model: nn.Module, caller: str) -> AdapterStore:
    store = store_of(model)
    if store is None:
        raise ValueError(f"{caller}: the model has no fastcur adapter (fastcur.inject first)")
    return store


def _known_or_raise(store: AdapterStore, adapter_name, caller: str) -> None:
    if adapter_name not in store.adapters:
        raise ValueError(f"{caller}: the model has no adapter named {adapter_name!r}; its adapters: "
                         f"{', '.join(map(repr, store.adapters))}")
