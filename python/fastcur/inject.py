"""The model-level API: put fastcur adapters into any nn.Module (a transformers model included),
and take them out again.

    model = fastcur.inject(model, fastcur.LoRAConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    fastcur.print_trainable_parameters(model)
    ...train...
    with fastcur.disable_adapters(model):
        base_logits = model(x)                  # the frozen base model
    model = fastcur.merge_and_unload(model)     # plain nn.Linear layers with the update folded in

`inject` records the config on the model as `model.fastcur_config` (save_adapter writes it).
Several named adapters on one model (`inject(..., adapter_name=)`, `set_adapter`, ...):
`fastcur.named_adapters`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from copy import deepcopy

import torch
from torch import nn

from .config import ALL_LINEAR, AdapterConfig, JumpLoRAConfig, matches
from .inclora import _block_of
from .modules.adapter_linear import AdapterLinear, is_conv1d
from .modules.jump_lora_linear import JumpLoRALinear, JumpThreshold
from .modules.secura_linear import SecuraLinear
from .named_adapters import (DEFAULT_ADAPTER, STORE_ATTR, add, check_adapter_name, check_unmerged, forget, show,
                             store_of)

CONFIG_ATTR = "fastcur_config"


def adapter_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every fastcur adapter layer of `model`, {qualified name: layer}, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcur.adapter_modules: model must be an nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel (`.module`) and `torch.compile` (`._orig_mod`)
    wrappers, so saved names do not depend on how the model was run."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head "all-linear" skips: `model.get_output_embeddings()` (transformers), else
    a module named `lm_head` (None if there is neither)."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            return head
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "lm_head":
            return module
    return None


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = _parent(model, name)
    setattr(parent, child, module)


def target_names(model: nn.Module, target_modules, *, caller: str = "fastcur.inject") -> list[str]:
    """Qualified names of the nn.Linear layers (and transformers `Conv1D` layers, GPT-2's
    weight-transposed linears) of `model` that `target_modules` names (see
    `fastcur.config`). Raises ValueError, naming `target_modules`, when none matches."""
    head = output_head(model) if target_modules == ALL_LINEAR else None
    names, not_linear, linears = [], [], []
    for name, module in model.named_modules():
        if not name:
            continue
        linear = isinstance(module, nn.Linear) or is_conv1d(module)
        # nn.MultiheadAttention reads out_proj.weight directly and never calls its forward,
        # so an adapter there would be silently ignored.
        parent, _ = _parent(model, name)
        if linear and isinstance(parent, nn.MultiheadAttention):
            linear = False
        if linear:
            linears.append(name)
        if not matches(name, target_modules):
            continue
        if not linear:
            if target_modules != ALL_LINEAR:
                not_linear.append(f"{name} ({type(module).__name__})")
            continue
        if module is head:
            continue
        names.append(name)
    if not names:
        hint = f"; named but not a supported nn.Linear: {', '.join(not_linear[:8])}" if not_linear else ""
        shown = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
        raise ValueError(f"{caller}: no nn.Linear layer of the model matches target_modules="
                         f"{target_modules!r}{hint}; the model's nn.Linear layers: {shown or 'none'}")
    return names


def _threshold_key(name: str, scope: str) -> str:
    return {"global": "", "per_block": _block_of(name), "per_layer": name}[scope]


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Replace the nn.Linear layers of `model` that `config.target_modules` names with
    `config.layer_class` layers (in place; the base weight and bias storage is reused), put a
    trainable copy of each module `config.modules_to_save` names in place, freeze every other
    parameter, and return `model`.

    `adapter_name` (default "default"): the adapter's name. A model that already holds adapters
    takes another one under a new name, on the same layers or others, of any method; the new
    adapter becomes the active one (`fastcur.set_adapter` switches back; see
    `fastcur.named_adapters`).

    Trainable afterwards: every parameter of the adapter layers except their `weight` and
    `bias` (LoRA's A, B; CUR-LoRA's U; SECURA's A_c, B_c, lora_bias; JumpLoRA's A, B and θ),
    and every parameter of the `modules_to_save` copies.
    JumpLoRA: one `JumpThreshold` per `config.threshold_scope` group (default: one for all).
    Raises ValueError when nothing matches, when the name is taken, when the active adapter
    is merged, or (naming the module) when a layer cannot take the adapter (e.g. a CUR rank
    above its size); on error the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcur.inject: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"fastcur.inject: config must be a fastcur adapter config (LoRAConfig, CURLoRAConfig, "
                        f"SecuraConfig, JumpLoRAConfig), got {type(config).__name__}")
    adapter_name = check_adapter_name(adapter_name, "fastcur.inject")
    store = store_of(model)
    previous = None
    if store is not None:
        if adapter_name in store.adapters:
            raise ValueError(f"fastcur.inject: the model already holds an adapter named {adapter_name!r} "
                             f"(its adapters: {', '.join(map(repr, store.adapters))}); pass another "
                             f"adapter_name, or fastcur.delete_adapter(model, {adapter_name!r}) first")
        check_unmerged(store, "fastcur.inject")
        previous = store.active
        show(model, store, None)         # the base view: targets are found and built on the base modules
    try:
        built, saved = _build_adapter(model, config)
    except BaseException:
        if store is not None:
            show(model, store, previous)
        raise
    add(model, adapter_name, config, built, saved)
    return model


def _build_adapter(model: nn.Module, config: AdapterConfig) -> tuple[dict[str, AdapterLinear], dict[str, nn.Module]]:
    """The adapter layers and `modules_to_save` copies `config` asks for, built off the model
    (nothing is put in; base weights are frozen, and unfrozen again on error)."""
    names = target_names(model, config.target_modules)
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    options = config.layer_options()
    thresholds: dict[str, JumpThreshold] = {}
    built: dict[str, AdapterLinear] = {}
    try:
        for name in names:
            linear = model.get_submodule(name)
            extra = {}
            if isinstance(config, JumpLoRAConfig):
                key = _threshold_key(name, config.threshold_scope)
                if key not in thresholds:
                    thresholds[key] = JumpThreshold(None if config.gate == "weight" else config.rank,
                                                    config.init_log_theta, device=linear.weight.device,
                                                    dtype=linear.weight.dtype, scope=config.threshold_scope)
                extra["threshold"] = thresholds[key]
            try:
                built[name] = config.layer_class.from_linear(linear, **options, **extra, module_name=name)
            except (ValueError, TypeError, RuntimeError) as e:
                raise ValueError(f"fastcur.inject: cannot put a {config.layer_class.__name__} on module "
                                 f"{name!r} (in_features={getattr(linear, 'in_features', getattr(linear, 'nx', '?'))}, "
                                 f"out_features={getattr(linear, 'out_features', getattr(linear, 'nf', '?'))}, "
                                 f"dtype={linear.weight.dtype}): {e}") from e
        saved = modules_to_save_copies(model, config, list(built))
    except BaseException:
        for p, flag in grad_state:
            p.requires_grad_(flag)
        raise
    return built, saved


def modules_to_save_copies(model: nn.Module, config: AdapterConfig, targets: list[str]) -> dict[str, nn.Module]:
    """{qualified name: a trainable deep copy} of each module `config.modules_to_save` names (the
    outermost match; the original stays with the base model). Raises ValueError, naming
    modules_to_save, when nothing matches, a match holds no parameter, or a match contains an
    adapter target."""
    selection = config.modules_to_save
    if selection is None:
        return {}
    found = [n for n, _ in model.named_modules() if n and matches(n, selection)]
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    caller = "fastcur.inject"
    if not outer:
        shown = ", ".join(n for n, _ in list(model.named_children())[:12])
        raise ValueError(f"{caller}: no module of the model matches modules_to_save={selection!r}; the "
                         f"model's top-level modules: {shown or 'none'}")
    copies = {}
    for name in outer:
        clash = [t for t in targets if t == name or t.startswith(name + ".")]
        if clash:
            raise ValueError(f"{caller}: modules_to_save module {name!r} contains the adapter target(s) "
                             f"{', '.join(clash[:4])}; a module is either adapted or saved whole")
        module = model.get_submodule(name)
        if next(module.parameters(), None) is None:
            raise ValueError(f"{caller}: modules_to_save module {name!r} ({type(module).__name__}) has no "
                             f"parameter to train")
        copy = deepcopy(module)
        copy.requires_grad_(True)
        copies[name] = copy
    return copies


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter except the adapter layers' own tensors
    (everything of an AdapterLinear but its `weight` and `bias`) and the active adapter's
    `modules_to_save` copies."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_modules(model).values():
        for n, p in layer.named_parameters():
            if n not in ("weight", "bias"):
                p.requires_grad_(True)
    store = vars(model).get(STORE_ATTR)
    if store is not None and store.active is not None:
        for module in store.adapters[store.active].saved.values():
            module.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of `model`; a tensor shared by several modules (e.g. a
    shared JumpThreshold, tied embeddings) counts once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print "trainable params: N || all params: M || trainable%: P" (PEFT's line) and return
    (N, M)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcur.print_trainable_parameters: model must be an nn.Module, "
                        f"got {type(model).__name__}")
    trainable, total = trainable_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
    return trainable, total


def _adapters_or_raise(model: nn.Module, caller: str) -> dict[str, AdapterLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    layers = adapter_modules(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no fastcur adapter layer (fastcur.inject first)")
    return layers


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with fastcur.disable_adapters(model):` runs the frozen base model: every adapter layer's
    `adapter_enabled` is False inside and restored to its previous value on exit (also on an
    exception); the original modules stand in for the active adapter's `modules_to_save`
    copies. A merged layer raises at forward (its base is gone until unmerge)."""
    layers = _adapters_or_raise(model, "fastcur.disable_adapters")
    inner = unwrap(model)
    store = store_of(inner)
    saved = store.adapters[store.active].saved if store is not None and store.active is not None else {}
    before = {name: layer.adapter_enabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.adapter_enabled = False
        for name in saved:
            _set_module(inner, name, store.bases[name])
        yield model
    finally:
        for name, layer in layers.items():
            layer.adapter_enabled = before[name]
        for name, module in saved.items():
            _set_module(inner, name, module)


# -- merging and unloading ----------------------------------------------------------------------
def _check_mergeable(layers: dict[str, AdapterLinear], caller: str) -> None:
    for name, layer in layers.items():
        if not callable(getattr(layer, "merge", None)):
            raise TypeError(f"{caller}: module {name!r} ({type(layer).__name__}) has no merge()")
        if isinstance(layer, JumpLoRALinear) and layer.gate != "weight":
            raise ValueError(f"{caller}: module {name!r} is a rank-gated JumpLoRALinear: its update depends "
                             f"on the input and has no weight-space form to merge (use gate='weight')")


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (layers already merged are left alone).

    LoRA, CUR-LoRA, JumpLoRA (weight gate, at the layer's current f): W += ΔW, reversible with
    `unmerge`, outputs unchanged up to rounding. SECURA: the method's own merge
    (`SecuraLinear.merge`: `merge_mode` "plain" W + ΔW or "signorm", then B_c = 0); it is not
    reversible and, with SigNorm on, changes the outputs by design (the SigNorm forward has no
    weight-space equivalent); afterwards the layer's output equals the plain linear's.
    Checks every layer first, so a model that cannot be merged is left unchanged."""
    layers = _adapters_or_raise(model, "fastcur.merge")
    _check_mergeable(layers, "fastcur.merge")
    for layer in layers.values():
        if isinstance(layer, SecuraLinear):
            layer.merge()
        elif not layer.merged:
            layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract the merged update again on every merged layer (W back up to rounding).
    Raises for SECURA layers (their merge is not reversible) before changing anything."""
    layers = _adapters_or_raise(model, "fastcur.unmerge")
    for name, layer in layers.items():
        if isinstance(layer, SecuraLinear):
            raise ValueError(f"fastcur.unmerge: module {name!r} is a SecuraLinear; SECURA's merge folds the "
                             f"update into W and resets B_c, so it cannot be undone")
    for layer in layers.values():
        if layer.merged:
            layer.unmerge()
    return model


def _plain_linear(layer: AdapterLinear) -> nn.Module:
    """The plain layer (nn.Linear, or the Conv1D it wrapped) holding `layer`'s weight and bias."""
    return layer.to_base_layer()


def _replace_all(model: nn.Module, layers: dict[str, AdapterLinear], keep_saved: bool) -> nn.Module:
    """Plain layers for `layers`; the active adapter's `modules_to_save` copies stay
    (`keep_saved`) or give way to the original modules; every adapter is forgotten."""
    store = store_of(model)
    for name, layer in layers.items():
        _set_module(model, name, _plain_linear(layer))
    if store is not None and store.active is not None and not keep_saved:
        for name in store.adapters[store.active].saved:
            _set_module(model, name, store.bases[name])
    forget(model)
    if CONFIG_ATTR in vars(model):
        delattr(model, CONFIG_ATTR)
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """`merge` every adapter, then put plain nn.Linear layers back (holding the merged W and
    b); returns `model`. Outputs are unchanged up to rounding, except SECURA with SigNorm on,
    whose merge is the method's own rule (see `merge`). The active adapter's `modules_to_save`
    copies stay in place (they are the trained modules); other named adapters are dropped."""
    layers = _adapters_or_raise(model, "fastcur.merge_and_unload")
    _check_mergeable(layers, "fastcur.merge_and_unload")
    merge(model)
    for layer in layers.values():
        if isinstance(layer, SecuraLinear):
            layer.fold_bias()        # lora_bias stays in Δ at a SECURA merge; the plain layer has no Δ
    return _replace_all(model, layers, keep_saved=True)


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Put plain nn.Linear layers back without the adapters' update (merged layers are
    unmerged first) and the original modules where `modules_to_save` copies stood; every named
    adapter is dropped; returns `model`. SECURA updates already folded by merges stay in W."""
    layers = _adapters_or_raise(model, "fastcur.unload")
    for layer in layers.values():
        if layer.merged:
            layer.unmerge()
    return _replace_all(model, layers, keep_saved=False)
