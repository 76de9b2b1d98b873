"""Save and load fastcur adapters: `fastcur_adapter.safetensors` + `fastcur_adapter.json`.

    fastcur.save_adapter(model, "out/task1")
    model = fastcur.load_adapter(build_base_model(), "out/task1")   # the same outputs, bit for bit on CPU

The folder's files and how they are checked on reading: `fastcur.adapter_files` (a third
file, `adapter_config.json`, only tells PEFT's loader that this is a fastcur adapter).

What is stored (tensor keys are the layer's qualified name + the tensor's name in the layer):
- every tensor of each adapter layer except its frozen base `weight` and `bias`: LoRA/JumpLoRA
  `lora_A.weight`, `lora_B.weight` (and ELLA's `W_past` when set); CUR-LoRA `U` and the buffers
  `rows`, `cols`, `C`, `R`; SECURA `A_c`, `B_c`, `lora_bias`, `rows`, `cols`, `C`, `R`;
- a JumpLoRA threshold once per sharing group, as `jump_thresholds.<i>.log_theta`;
- the `modules_to_save` copies' whole state (`lm_head.weight`, ...);
- SECURA layers that merged (`SecuraLinear.merge`, `MergeSchedule`): their `weight` and `bias`
  too, because a SECURA merge changes W for good and the base model no longer has it; with
  `restrain=True` also the restrain generator's state (`restrain_generator_state`, uint8);
- in the JSON: method, adapter name, `config` (the injected config's `to_dict()`),
  `target_modules` (the names actually replaced), fastcur's version, and per layer its shape,
  dtype, the options it was built with and its state (`merged`, SECURA's merge count,
  JumpLoRA's f and threshold group), the threshold groups, the modules_to_save, an optional
  MergeSchedule state, and the SHA-256 of the tensor file (a tensor file from another save or
  a damaged one is refused).
Layers merged with the reversible merge (LoRA, CUR-LoRA, JumpLoRA) are saved with their
adapter tensors and `merged: true`; loading merges them again, giving the same W.
`save_adapter` never drops a trainable tensor silently: one outside the adapter and its
modules_to_save is an error naming it.

Writes are atomic (`fastcur._atomic.atomic_folder`): the new version is written into a fresh
folder beside the target and switched in with one rename, so after a crash at any instant
(kill -9 included) the folder holds either the old adapter or the new one, both loadable;
other files in the folder (a Trainer checkpoint's) are kept. Loads validate everything
(config, every tensor's key, shape and index range) before changing the model, and a
failure leaves the model as it was.

A model wrapped in DDP / DataParallel / `torch.compile` is unwrapped first (the names saved
are the plain model's); FSDP2-sharded tensors (DTensor) are gathered with `full_tensor()`,
which is a collective: under FSDP2 call `save_adapter` on every rank.

IncLoRA (`fastcur.IncLoRA`) is not covered: between tasks its adapters are merged into W and
removed, so its state is the whole base weight plus the manager's W_past; checkpoint it with
`IncLoRA.save`. A running task's JumpLoRA layers do save and load here.
"""
from __future__ import annotations

import os
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_folder
from .adapter_files import ADAPTER_FILES, FORMAT, FORMAT_VERSION, read_document, read_tensors, write_folder
from .config import AdapterConfig, JumpLoRAConfig, config_class, config_class_of_layer
from .inject import CONFIG_ATTR, adapter_modules, freeze_base, unwrap
from .modules.adapter_linear import AdapterLinear, is_conv1d
from .modules.jump_lora_linear import JumpLoRALinear, JumpThreshold
from .modules.secura_linear import MergeSchedule, SecuraLinear
from .named_adapters import (DEFAULT_ADAPTER, NamedAdapter, add, check_adapter_name, check_unmerged, set_adapter,
                             show, store_of)

THRESHOLD_PREFIX = "jump_thresholds"
GENERATOR_KEY = "restrain_generator_state"
STATE_OPTIONS = ("f",)   # options that are state: loading sets them instead of requiring a match
INDEX_KEYS = {"rows": "out_features", "cols": "in_features"}   # CUR indices into W's rows / columns


def _version() -> str:
    from . import __version__
    return __version__


# -- writing --------------------------------------------------------------------------------------
def _cpu(t: torch.Tensor) -> torch.Tensor:
    # a private contiguous CPU copy: safetensors refuses tensors that share storage
    t = t.detach()
    if callable(getattr(t, "full_tensor", None)):    # a DTensor (FSDP2): gather the whole tensor
        t = t.full_tensor()
    return t.to("cpu", copy=True).contiguous()


def _layer_tensors(layer: AdapterLinear) -> dict[str, torch.Tensor]:
    """The tensors of one layer that a save stores, {name in the layer: tensor}."""
    out = {k: v for k, v in layer.state_dict().items()
           if k not in ("weight", "bias") and not k.startswith("threshold.")}
    if isinstance(layer, SecuraLinear):
        if layer.merges:
            out["weight"] = layer.weight
            if layer.bias is not None:
                out["bias"] = layer.bias
        if layer.restrain:
            out[GENERATOR_KEY] = layer._generator.get_state()
    return out


def _layer_state(layer: AdapterLinear) -> dict[str, Any]:
    state: dict[str, Any] = {"merged": bool(layer.merged)}
    if isinstance(layer, SecuraLinear):
        state["merges"] = layer.merges
        state["has_bias"] = layer.bias is not None
    return state


def _adapter_config(config: AdapterConfig | None, layers: dict[str, AdapterLinear]) -> AdapterConfig:
    classes = {type(m) for m in layers.values()}
    if len(classes) > 1:
        raise ValueError(f"fastcur.save_adapter: the adapter mixes layer classes "
                         f"({', '.join(sorted(c.__name__ for c in classes))}); one method per adapter is saved "
                         f"(give each method its own adapter_name)")
    cls = config_class_of_layer(next(iter(layers.values())))
    if isinstance(config, cls):
        return config
    # adapters built by hand (or by load_peft_adapter): describe them from the first layer
    options = cls.options_of(next(iter(layers.values())))
    known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
    return cls(**known, target_modules=list(layers))


def _saved_adapter(model: nn.Module, adapter_name: str | None, caller: str) -> tuple[str, NamedAdapter, bool]:
    """(name, adapter, whether it is the active one) of the adapter to save."""
    store = store_of(model)
    if store is None:
        raise ValueError(f"{caller}: the model has no fastcur adapter layer (fastcur.inject first)")
    name = store.active if adapter_name is None else check_adapter_name(adapter_name, caller)
    if name not in store.adapters:
        raise ValueError(f"{caller}: the model has no adapter named {name!r}; its adapters: "
                         f"{', '.join(map(repr, store.adapters))}")
    return name, store.adapters[name], name == store.active


def _check_nothing_dropped(model: nn.Module, kept: list[nn.Module], caller: str) -> None:
    """Raise, naming them, if `model` has trainable tensors outside the modules `kept`."""
    ours = {id(p) for m in kept for p in m.parameters()}
    lost = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ours]
    if lost:
        shown = ", ".join(lost[:6]) + (f", ... ({len(lost)} in all)" if len(lost) > 6 else "")
        raise ValueError(f"{caller}: trainable tensor(s) {shown} are neither adapter tensors nor in the config's "
                         f"modules_to_save, so the saved adapter would lose them; inject with "
                         f"modules_to_save=[...] naming their modules, or freeze them (requires_grad_(False))")


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, adapter_name: str | None = None,
                 merge_schedule: MergeSchedule | None = None) -> str:
    """Write an adapter of `model` to the folder `directory` (created if needed; see the module
    doc for what is stored). `adapter_name`: which named adapter (default: the active one).
    `merge_schedule`: a SECURA `MergeSchedule` whose counters to store (restore with
    `load_adapter(..., merge_schedule=)` or `MergeSchedule.load_state_dict`). Returns the path.

    Raises ValueError, naming them, when the model has trainable tensors the adapter would not
    hold (add their modules to the config's `modules_to_save`, or freeze them)."""
    caller = "fastcur.save_adapter"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    if merge_schedule is not None and not isinstance(merge_schedule, MergeSchedule):
        raise TypeError(f"{caller}: merge_schedule must be a fastcur.MergeSchedule or None, "
                        f"got {type(merge_schedule).__name__}")
    model = unwrap(model)
    name, adapter, active = _saved_adapter(model, adapter_name, caller)
    layers = adapter.layers
    config = _adapter_config(adapter.config, layers)
    cls = type(config)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{caller}: directory {directory!r} exists and is not a folder")
    if active:
        _check_nothing_dropped(model, [*layers.values(), *adapter.saved.values()], caller)

    tensors: dict[str, torch.Tensor] = {}
    layer_info: dict[str, Any] = {}
    groups: dict[int, dict[str, Any]] = {}
    for lname, layer in layers.items():
        if getattr(layer, "_selected", True) is False:
            layer.select()                  # a CUR/SECURA layer that has not run yet: select as forward would
        own = _layer_tensors(layer)
        for key, t in own.items():
            tensors[f"{lname}.{key}"] = _cpu(t)
        info = {"class": type(layer).__name__, "in_features": layer.in_features,
                "out_features": layer.out_features, "bias": layer.bias is not None,
                "dtype": str(layer.weight.dtype).removeprefix("torch."),
                "options": cls.options_of(layer), "state": _layer_state(layer), "tensors": sorted(own)}
        if isinstance(layer, JumpLoRALinear):
            group = groups.setdefault(id(layer.threshold), {"key": f"{THRESHOLD_PREFIX}.{len(groups)}.log_theta",
                                                            "layers": []})
            group["layers"].append(lname)
            info["state"]["threshold"] = group["key"]
            tensors.setdefault(group["key"], _cpu(layer.threshold.log_theta))
        layer_info[lname] = info
    saved_info = {}
    for mname, module in adapter.saved.items():
        state = module.state_dict()
        for key, t in state.items():
            tensors[f"{mname}.{key}"] = _cpu(t)
        saved_info[mname] = {"class": type(module).__name__, "tensors": sorted(state)}

    document = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fastcur_version": _version(),
        "method": cls.method, "adapter_name": name, "config": config.to_dict(), "target_modules": list(layers),
        "layers": layer_info, "jump_thresholds": list(groups.values()), "modules_to_save": saved_info,
        "merge_schedule": merge_schedule.state_dict() if merge_schedule is not None else None,
    }
    with atomic_folder(directory, replaces=ADAPTER_FILES) as staging:
        write_folder(staging, tensors, document, cls.method)
    return directory


# -- reading --------------------------------------------------------------------------------------
def read_adapter_config(directory: str | os.PathLike, *, _caller: str = "fastcur.read_adapter_config"
                        ) -> dict[str, Any]:
    """The parsed, checked config (`fastcur_adapter.json`) of a fastcur adapter folder."""
    return read_document(os.fspath(directory), _caller)[1]


def _list(names, limit: int = 10) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_base(model: nn.Module, document: dict) -> list[str]:
    """Problems that make `model` the wrong base for this adapter (empty if none)."""
    problems = []
    for name, info in document["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name!r} does not exist in the model")
            continue
        if isinstance(module, AdapterLinear):
            if type(module).__name__ != info["class"]:
                problems.append(f"module {name!r} is a {type(module).__name__}, the adapter has a {info['class']}")
                continue
            got = (module.out_features, module.in_features)
        elif isinstance(module, nn.Linear):
            got = (module.out_features, module.in_features)
        elif is_conv1d(module):
            got = tuple(module.weight.shape[::-1])          # transformers Conv1D keeps W as [in, out]
        else:
            problems.append(f"module {name!r} is a {type(module).__name__}, expected an nn.Linear")
            continue
        want = (info["out_features"], info["in_features"])
        if want != got:
            problems.append(f"module {name!r} has weight shape [out, in] = {list(got)}, the adapter was "
                            f"saved for {list(want)}")
    for name, info in (document.get("modules_to_save") or {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"modules_to_save module {name!r} does not exist in the model")
            continue
        if type(module).__name__ != info["class"]:
            problems.append(f"modules_to_save module {name!r} is a {type(module).__name__}, the adapter saved "
                            f"a {info['class']}")
    return problems


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, adapter_name: str | None = None,
                 method: str | None = None, merge_schedule: MergeSchedule | None = None) -> nn.Module:
    """Load a `save_adapter` folder into `model` as the adapter `adapter_name`, make it the
    active adapter, and return `model`.

    `adapter_name` (default: the model's active adapter if it has one, else "default"): an
    adapter the model already holds is loaded in place (its layers and options must match);
    a new name is added beside the model's other adapters (see `fastcur.named_adapters`),
    its layers injected at the saved module names of the base. On the CPU the result
    reproduces the saved model's outputs exactly. `method`: the method the caller expects
    ("lora", "curlora", "secura", "jumplora"); a folder of another method is refused.
    `merge_schedule`: a MergeSchedule of this model whose counters are restored.

    Errors (nothing in the model changes when one is raised): a missing, damaged or edited
    file (named, with the field), another method, a wrong base (each mismatching module named
    with both shapes), missing or extra tensors (listed), a tensor of the wrong shape or an
    index out of range (named).
    """
    caller = "fastcur.load_adapter"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    outer, model = model, unwrap(model)
    if method is not None:
        config_class(method)            # an unknown name raises here, listing the known ones
    directory = os.fspath(directory)
    path, document = read_document(directory, caller)
    saved_method = document["method"]
    if method is not None and saved_method != method:
        raise ValueError(f"{caller}: {path} holds a {saved_method!r} adapter, but method={method!r} was asked for")
    try:
        cls = config_class(saved_method)
        config = AdapterConfig.from_dict(document["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{caller}: {path}: 'method' / 'config' do not describe a fastcur adapter ({e})") from None
    if merge_schedule is not None:
        if not isinstance(merge_schedule, MergeSchedule):
            raise TypeError(f"{caller}: merge_schedule must be a fastcur.MergeSchedule or None, "
                            f"got {type(merge_schedule).__name__}")
        if document.get("merge_schedule") is None:
            raise ValueError(f"{caller}: merge_schedule was given, but {directory} was saved "
                             f"without one (save_adapter(..., merge_schedule=))")

    store = store_of(model)
    if adapter_name is not None:
        check_adapter_name(adapter_name, caller)
    name = adapter_name or (store.active if store is not None and store.active else DEFAULT_ADAPTER)
    in_place = store is not None and name in store.adapters
    previous = store.active if store is not None else None
    if store is not None and not (in_place and name == previous):
        check_unmerged(store, caller)
    tensors = read_tensors(directory, path, document, caller)
    try:
        if in_place:
            set_adapter(model, name)
        elif store is not None:
            show(model, store, None)           # a new adapter is built on the base modules
        _load_into(model, document, path, cls, config, tensors, name, in_place, caller)
    except BaseException:
        if store is not None and store.active != previous:
            show(model, store, previous)
        raise
    if merge_schedule is not None:
        merge_schedule.load_state_dict(document["merge_schedule"])
    return outer


def _load_into(model, document, path, cls, config, tensors, name, in_place, caller) -> None:
    directory = os.path.dirname(path)
    problems = _check_base(model, document)
    present = adapter_modules(model) if in_place else {}
    if present and set(present) != set(document["layers"]):
        problems.append(f"the model's adapter {name!r} sits at other modules (extra: "
                        f"{_list(set(present) - set(document['layers'])) or 'none'}; missing: "
                        f"{_list(set(document['layers']) - set(present)) or 'none'})")
    if problems:
        raise ValueError(f"{caller}: the model is not the base this adapter was saved for "
                         f"({directory}): " + "; ".join(problems))
    saved_doc = document.get("modules_to_save") or {}
    listed = {f"{n}.{key}" for n, info in document["layers"].items() for key in info["tensors"]}
    listed |= {g["key"] for g in document.get("jump_thresholds", [])}
    listed |= {f"{n}.{key}" for n, info in saved_doc.items() for key in info["tensors"]}
    missing, extra = listed - set(tensors), set(tensors) - listed
    if missing or extra:
        raise ValueError(f"{caller}: {os.path.join(directory, document['weights_file'])} does not hold the "
                         f"tensors {os.path.basename(path)} lists; missing keys: {_list(missing) or 'none'}; "
                         f"unexpected keys: {_list(extra) or 'none'}")
    store = store_of(model)
    held = store.adapters[name].saved if in_place else {}
    if in_place and set(held) != set(saved_doc):
        raise ValueError(f"{caller}: the model's adapter {name!r} trains modules_to_save "
                         f"{_list(held) or 'none'}, the saved one {_list(saved_doc) or 'none'}")
    saved = _saved_modules(model, saved_doc, tensors, held, caller)

    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers = _build_layers(model, document, cls, tensors, present)
    except BaseException:
        for p, flag in grad_state:       # from_linear froze base weights of layers never put in
            p.requires_grad_(flag)
        raise
    if in_place:
        for mname, (module, state) in saved.items():
            with torch.no_grad():
                for key, t in module.state_dict().items():
                    t.copy_(state[key])
        store.adapters[name].config = config
        setattr(model, CONFIG_ATTR, config)
        freeze_base(model)
    else:
        fresh = {}
        for mname, (module, state) in saved.items():
            module.load_state_dict(state)
            fresh[mname] = module
        add(model, name, config, layers, fresh)


def _saved_modules(model, saved_doc, tensors, held, caller) -> dict[str, tuple[nn.Module, dict]]:
    """{name: (module to fill, its saved state)} of the modules_to_save, every tensor's shape
    checked: the adapter's own copies (`held`, loaded in place) or fresh copies of the base's."""
    out = {}
    for mname, info in saved_doc.items():
        state = {key: tensors[f"{mname}.{key}"] for key in info["tensors"]}
        module = held[mname] if mname in held else deepcopy(model.get_submodule(mname))
        own = module.state_dict()
        if set(own) != set(state):
            raise ValueError(f"{caller}: the saved modules_to_save module {mname!r} holds "
                             f"{_list(state)}, the model's holds {_list(own)}")
        for key, t in own.items():
            if tuple(t.shape) != tuple(state[key].shape):
                raise ValueError(f"{caller}: tensor {mname}.{key} has shape {list(state[key].shape)}, "
                                 f"module {mname!r} needs {list(t.shape)}")
        out[mname] = (module, state)
    return out


def _thresholds(model, document, tensors, present) -> dict[str, JumpThreshold]:
    """One JumpThreshold per saved group (the model's own when it already holds the layers)."""
    out = {}
    for group in document.get("jump_thresholds", []):
        value = tensors[group["key"]]
        if present:
            held = {id(present[n].threshold) for n in group["layers"]}
            if len(held) != 1:
                raise ValueError(f"fastcur.load_adapter: the saved layers {_list(group['layers'])} share one "
                                 f"threshold, but in the model they hold {len(held)} different ones")
            threshold = present[group["layers"][0]].threshold
        else:
            first = model.get_submodule(group["layers"][0])
            threshold = JumpThreshold(None if value.dim() == 0 else value.shape[0], device=first.weight.device,
                                      dtype=first.weight.dtype)
        if tuple(threshold.log_theta.shape) != tuple(value.shape):
            raise ValueError(f"fastcur.load_adapter: tensor {group['key']!r} has shape {list(value.shape)}, "
                             f"the model's threshold has {list(threshold.log_theta.shape)}")
        out[group["key"]] = (threshold, value)
    return out


@torch.no_grad()
def _build_layers(model, document, cls, tensors, present) -> dict[str, AdapterLinear]:
    """Build (or take) every adapter layer and fill it. New layers are not put into the model
    here; tensors (SECURA's merged W included) are written only after every check passed."""
    thresholds = _thresholds(model, document, tensors, present)
    layers, loads = {}, []
    for name, info in document["layers"].items():
        options = dict(info["options"])
        state = info["state"]
        own = {key: tensors[f"{name}.{key}"] for key in info["tensors"]}
        if name in present:
            layer = present[name]
            current = cls.options_of(layer)
            differ = {k: (v, current.get(k)) for k, v in options.items()
                      if current.get(k) != v and k not in STATE_OPTIONS}
            if differ:
                raise ValueError(f"fastcur.load_adapter: module {name!r} was built with other options than "
                                 f"the saved ones (saved, model): {differ}")
            if isinstance(layer, SecuraLinear) and layer.merges and not state.get("merges"):
                raise ValueError(f"fastcur.load_adapter: module {name!r} has {layer.merges} SECURA merge(s) "
                                 f"folded into its W, but the adapter was saved on the unmerged base; load "
                                 f"into a fresh base model")
        else:
            linear = model.get_submodule(name)
            if issubclass(cls, JumpLoRAConfig):
                options["threshold"] = thresholds[state["threshold"]][0]
            try:
                layer = cls.layer_class.from_linear(linear, **options, module_name=name)  # writes nothing of W
            except (ValueError, TypeError, RuntimeError) as e:
                raise ValueError(f"fastcur.load_adapter: cannot rebuild the {info['class']} of module "
                                 f"{name!r}: {e}") from e
        if layer.merged:
            raise ValueError(f"fastcur.load_adapter: module {name!r} of the model is merged; unmerge it "
                             f"(fastcur.unmerge) before loading into it")
        loads.append((name, layer, own, state))
        layers[name] = layer
    # check every tensor against its destination before any copy
    for name, layer, own, state in loads:
        expected = _layer_tensors_expected(layer, own, state)
        missing, extra = expected - set(own), set(own) - expected
        if missing or extra:
            raise ValueError(f"fastcur.load_adapter: the saved tensors of module {name!r} do not fit a "
                             f"{type(layer).__name__}; missing keys: {_list(missing) or 'none'}; "
                             f"unexpected keys: {_list(extra) or 'none'}")
        for key, value in own.items():
            target = _destination(layer, key)
            if target is not None and tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"fastcur.load_adapter: tensor {name}.{key} has shape {list(value.shape)}, "
                                 f"module {name!r} needs {list(target.shape)}")
            if target is not None and value.is_floating_point() != target.is_floating_point():
                raise ValueError(f"fastcur.load_adapter: tensor {name}.{key} has dtype {value.dtype}, "
                                 f"module {name!r} needs {target.dtype}")
            if key in INDEX_KEYS and value.numel():
                size = getattr(layer, INDEX_KEYS[key])
                if int(value.min()) < 0 or int(value.max()) >= size:
                    raise ValueError(f"fastcur.load_adapter: tensor {name}.{key} holds indices in "
                                     f"[{int(value.min())}, {int(value.max())}], module {name!r} has "
                                     f"{size} {'rows' if key == 'rows' else 'columns'}")
        if isinstance(layer, JumpLoRALinear):
            f = document["layers"][name]["options"].get("f")
            if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= f <= 1.0:
                raise ValueError(f"fastcur.load_adapter: layers[{name!r}]['options']['f'] must be a number in "
                                 f"[0, 1], got {f!r}")
    undo = _snapshot(loads, thresholds)
    try:
        for name, layer, own, state in loads:
            _fill(layer, own, state)
            if isinstance(layer, JumpLoRALinear):
                layer.f = document["layers"][name]["options"]["f"]
        for threshold, value in thresholds.values():
            threshold.log_theta.copy_(value)
        for name, layer, own, state in loads:
            if state.get("merged") and not layer.merged:
                layer.merge()
    except BaseException:
        undo()
        raise
    return layers


def _snapshot(loads, thresholds):
    """A function that puts back every tensor and counter a fill may write (the checks before
    should leave nothing to fail; this keeps a surprise from leaving the model half loaded)."""
    tensors = []
    attrs = []
    for name, layer, own, state in loads:
        for key in own:
            target = _destination(layer, key)
            if target is not None and not (key == "W_past" and layer.W_past is None):
                tensors.append((target, target.detach().clone()))
        attrs.append((layer, {k: getattr(layer, k) for k in ("merges", "f", "merged", "bias", "W_past")
                              if hasattr(layer, k)}))
    for threshold, _ in thresholds.values():
        tensors.append((threshold.log_theta, threshold.log_theta.detach().clone()))

    @torch.no_grad()
    def undo() -> None:
        for target, value in tensors:
            target.copy_(value)
        for layer, values in attrs:
            for k, v in values.items():
                if getattr(layer, k, None) is not v:
                    setattr(layer, k, v)
    return undo


def _layer_tensors_expected(layer: AdapterLinear, own: dict, state: dict) -> set[str]:
    keys = {k for k in layer.state_dict() if k not in ("weight", "bias") and not k.startswith("threshold.")}
    if isinstance(layer, JumpLoRALinear) and "W_past" in own:
        keys.add("W_past")                   # ELLA's buffer exists only once set
    if isinstance(layer, SecuraLinear):
        if state.get("merges"):
            keys.add("weight")
            if state.get("has_bias"):
                keys.add("bias")
        if layer.restrain:
            keys.add(GENERATOR_KEY)
    return keys


def _destination(layer: AdapterLinear, key: str) -> torch.Tensor | None:
    if key == GENERATOR_KEY or (key == "bias" and layer.bias is None):
        return None
    if key == "W_past" and layer.W_past is None:
        return layer.weight
    return layer.get_parameter(key) if key in dict(layer.named_parameters()) else layer.get_buffer(key)


def _fill(layer: AdapterLinear, own: dict[str, torch.Tensor], state: dict) -> None:
    own = dict(own)
    generator = own.pop(GENERATOR_KEY, None)
    if isinstance(layer, JumpLoRALinear) and "W_past" in own:
        layer.set_w_past(own.pop("W_past"))
    if isinstance(layer, SecuraLinear):
        if state.get("has_bias") and layer.bias is None:
            # a SECURA merge of a nonzero lora_bias gave the layer a bias the base lacks
            layer.bias = nn.Parameter(torch.zeros(layer.out_features, device=layer.weight.device,
                                                  dtype=layer.weight.dtype), requires_grad=False)
        layer.merges = int(state.get("merges", 0))
        if generator is not None:
            layer._generator.set_state(generator)
    # load_state_dict runs each class's own hook (CUR/SECURA keep the saved rows, cols, C, R
    # and re-check the tied fast path against the loaded W)
    result = layer.load_state_dict(own, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"fastcur.load_adapter: {type(layer).__name__} did not take {result.unexpected_keys}")
