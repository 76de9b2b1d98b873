"""Save and load fastcur adapters: `adapter_model.safetensors` + `adapter_config.json`.

    fastcur.save_adapter(model, "out/task1")
    model = fastcur.load_adapter(build_base_model(), "out/task1")   # the same outputs, bit for bit on CPU

What is stored (tensor keys are the layer's qualified name + the tensor's name in the layer):
- every tensor of each adapter layer except its frozen base `weight` and `bias`: LoRA/JumpLoRA
  `lora_A.weight`, `lora_B.weight` (and ELLA's `W_past` when set); CUR-LoRA `U` and the buffers
  `rows`, `cols`, `C`, `R`; SECURA `A_c`, `B_c`, `lora_bias`, `rows`, `cols`, `C`, `R`;
- a JumpLoRA threshold once per sharing group, as `jump_thresholds.<i>.log_theta`;
- SECURA layers that merged (`SecuraLinear.merge`, `MergeSchedule`): their `weight` and `bias`
  too, because a SECURA merge changes W for good and the base model no longer has it; with
  `restrain=True` also the restrain generator's state (`restrain_generator_state`, uint8);
- in the JSON: method, `config` (the injected config's `to_dict()`), `target_modules` (the
  names actually replaced), fastcur's version, and per layer its shape, dtype, the options it
  was built with and its state (`merged`, SECURA's merge count, JumpLoRA's f and threshold
  group), the threshold groups, an optional MergeSchedule state, and the SHA-256 of the
  tensor file (a tensor file from another save or a damaged one is refused).
Layers merged with the reversible merge (LoRA, CUR-LoRA, JumpLoRA) are saved with their
adapter tensors and `merged: true`; loading merges them again, giving the same W.

Writes are atomic: each file goes to a temporary file in the same folder, is flushed to disk
and renamed over the old one, the tensors first and the JSON (which names the tensors'
hash) last, so an interrupted save leaves the previous adapter loadable or a mismatch that
`load_adapter` reports, never a silently half-written adapter.

A model wrapped in DDP / DataParallel / `torch.compile` is unwrapped first (the names saved
are the plain model's); FSDP2-sharded tensors (DTensor) are gathered with `full_tensor()`,
which is a collective: under FSDP2 call `save_adapter` on every rank.

IncLoRA (`fastcur.IncLoRA`) is not covered: between tasks its adapters are merged into W and
removed, so its state is the whole base weight plus the manager's W_past; checkpoint it with
`torch.save(model.state_dict())`. A running task's JumpLoRA layers do save and load here.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_write
from .config import AdapterConfig, JumpLoRAConfig, config_class, config_class_of_layer
from .inject import CONFIG_ATTR, _set_module, adapter_modules, freeze_base, unwrap
from .modules.adapter_linear import AdapterLinear
from .modules.jump_lora_linear import JumpLoRALinear, JumpThreshold
from .modules.secura_linear import MergeSchedule, SecuraLinear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "fastcur-adapter"
FORMAT_VERSION = 1
THRESHOLD_PREFIX = "jump_thresholds"
GENERATOR_KEY = "restrain_generator_state"
STATE_OPTIONS = ("f",)   # options that are state: loading sets them instead of requiring a match


def _version() -> str:
    from . import __version__
    return __version__


# -- writing --------------------------------------------------------------------------------------
_atomic_write = atomic_write


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _model_config(model: nn.Module, layers: dict[str, AdapterLinear]) -> AdapterConfig:
    classes = {type(m) for m in layers.values()}
    if len(classes) > 1:
        raise ValueError(f"fastcur.save_adapter: the model mixes adapter classes "
                         f"({', '.join(sorted(c.__name__ for c in classes))}); one method per model is saved")
    cls = config_class_of_layer(next(iter(layers.values())))
    config = getattr(model, CONFIG_ATTR, None)
    if isinstance(config, cls):
        return config
    # adapters built by hand (or by load_peft_adapter): describe them from the first layer
    options = cls.options_of(next(iter(layers.values())))
    known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
    return cls(**known, target_modules=list(layers))


def save_adapter(model: nn.Module, directory: str | os.PathLike, *,
                 merge_schedule: MergeSchedule | None = None) -> str:
    """Write the adapter of `model` to `directory` (created if needed): `adapter_model.safetensors`
    and `adapter_config.json` (see the module doc for what they hold). `merge_schedule`: a
    SECURA `MergeSchedule` whose counters to store (restore with `load_adapter(...,
    merge_schedule=)` or `MergeSchedule.load_state_dict`). Returns the directory path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcur.save_adapter: model must be an nn.Module, got {type(model).__name__}")
    if merge_schedule is not None and not isinstance(merge_schedule, MergeSchedule):
        raise TypeError(f"fastcur.save_adapter: merge_schedule must be a fastcur.MergeSchedule or None, "
                        f"got {type(merge_schedule).__name__}")
    model = unwrap(model)
    layers = adapter_modules(model)
    if not layers:
        raise ValueError("fastcur.save_adapter: the model has no fastcur adapter layer (fastcur.inject first)")
    config = _model_config(model, layers)
    cls = type(config)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"fastcur.save_adapter: directory {directory!r} exists and is not a folder")
    os.makedirs(directory, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    layer_info: dict[str, Any] = {}
    groups: dict[int, dict[str, Any]] = {}
    for name, layer in layers.items():
        if getattr(layer, "_selected", True) is False:
            layer.select()                  # a CUR/SECURA layer that has not run yet: select as forward would
        own = _layer_tensors(layer)
        for key, t in own.items():
            tensors[f"{name}.{key}"] = _cpu(t)
        info = {"class": type(layer).__name__, "in_features": layer.in_features,
                "out_features": layer.out_features, "bias": layer.bias is not None,
                "dtype": str(layer.weight.dtype).removeprefix("torch."),
                "options": cls.options_of(layer), "state": _layer_state(layer), "tensors": sorted(own)}
        if isinstance(layer, JumpLoRALinear):
            group = groups.setdefault(id(layer.threshold), {"key": f"{THRESHOLD_PREFIX}.{len(groups)}.log_theta",
                                                            "layers": []})
            group["layers"].append(name)
            info["state"]["threshold"] = group["key"]
            tensors.setdefault(group["key"], _cpu(layer.threshold.log_theta))
        layer_info[name] = info

    weights_path = os.path.join(directory, WEIGHTS_NAME)
    from safetensors.torch import save_file
    _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt",
                                                                            "fastcur_method": cls.method}))
    document = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fastcur_version": _version(),
        "method": cls.method, "config": config.to_dict(), "target_modules": list(layers),
        "layers": layer_info, "jump_thresholds": list(groups.values()),
        "merge_schedule": merge_schedule.state_dict() if merge_schedule is not None else None,
        "weights_file": WEIGHTS_NAME, "weights_sha256": _sha256(weights_path),
    }
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(os.path.join(directory, CONFIG_NAME), write_json)
    return directory


# -- reading --------------------------------------------------------------------------------------
def read_adapter_config(directory: str | os.PathLike, *, _caller: str = "fastcur.read_adapter_config"
                        ) -> dict[str, Any]:
    """The parsed `adapter_config.json` of a fastcur adapter directory (checked to be one)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{_caller}: no adapter directory at {directory!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_caller}: {path} is missing (not an adapter directory, or "
                                f"a save was interrupted before its config was written)")
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{_caller}: {path} is not valid JSON ({e}); the file is corrupt "
                         f"or truncated") from None
    if not isinstance(document, dict):
        raise ValueError(f"{_caller}: {path} holds a {type(document).__name__}, not a JSON object")
    if document.get("format") != FORMAT:
        if "peft_type" in document:
            raise ValueError(f"{_caller}: {path} is a PEFT adapter config (peft_type="
                             f"{document['peft_type']!r}); load it with fastcur.load_peft_adapter")
        raise ValueError(f"{_caller}: {path} is not a fastcur adapter config "
                         f"(format = {document.get('format')!r}, expected {FORMAT!r})")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{_caller}: {path} has format_version {document['format_version']}, "
                         f"written by fastcur {document.get('fastcur_version')}; this fastcur "
                         f"({_version()}) reads up to {FORMAT_VERSION}; upgrade fastcur")
    for key in ("method", "config", "layers", "target_modules"):
        if key not in document:
            raise ValueError(f"{_caller}: {path} lacks the key {key!r}; the file is damaged")
    return document


def _read_tensors(directory: str, document: dict) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, document.get("weights_file", WEIGHTS_NAME))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastcur.load_adapter: {path} is missing")
    expected = document.get("weights_sha256")
    if expected is not None and _sha256(path) != expected:
        raise ValueError(f"fastcur.load_adapter: {path} does not match {CONFIG_NAME} (its SHA-256 differs "
                         f"from the one recorded at save): the file is corrupt or truncated, or comes "
                         f"from another save (an interrupted save?)")
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"fastcur.load_adapter: {path} is not a readable safetensors file ({e}); "
                         f"the file is corrupt or truncated") from None


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
        elif not isinstance(module, nn.Linear):
            problems.append(f"module {name!r} is a {type(module).__name__}, expected an nn.Linear")
            continue
        want = (info["out_features"], info["in_features"])
        got = (module.out_features, module.in_features)
        if want != got:
            problems.append(f"module {name!r} has weight shape [out, in] = {list(got)}, the adapter was "
                            f"saved for {list(want)}")
    return problems


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, method: str | None = None,
                 merge_schedule: MergeSchedule | None = None) -> nn.Module:
    """Load a `save_adapter` directory into `model` and return it.

    `model` is either a fresh base model (the adapter layers are injected at the saved module
    names, then loaded) or one that already holds the same adapter layers (they are loaded in
    place; options must match). On the CPU the result reproduces the saved model's outputs
    exactly. `method`: the method the caller expects ("lora", "curlora", "secura",
    "jumplora"); a directory of another method is refused. `merge_schedule`: a MergeSchedule
    of this model whose counters are restored from the saved ones.

    Errors (nothing in the model changes when one is raised): a missing or corrupt file (named),
    another method, a wrong base (each mismatching module named with both shapes), missing or
    extra tensors (listed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcur.load_adapter: model must be an nn.Module, got {type(model).__name__}")
    outer, model = model, unwrap(model)
    if method is not None:
        config_class(method)            # an unknown name raises here, listing the known ones
    document = read_adapter_config(directory, _caller="fastcur.load_adapter")
    directory = os.fspath(directory)
    saved_method = document["method"]
    if method is not None and saved_method != method:
        raise ValueError(f"fastcur.load_adapter: {os.path.join(directory, CONFIG_NAME)} holds a "
                         f"{saved_method!r} adapter, but method={method!r} was asked for")
    cls = config_class(saved_method)
    config = AdapterConfig.from_dict(document["config"])
    if merge_schedule is not None:
        if not isinstance(merge_schedule, MergeSchedule):
            raise TypeError(f"fastcur.load_adapter: merge_schedule must be a fastcur.MergeSchedule or None, "
                            f"got {type(merge_schedule).__name__}")
        if document.get("merge_schedule") is None:
            raise ValueError(f"fastcur.load_adapter: merge_schedule was given, but {directory} was saved "
                             f"without one (save_adapter(..., merge_schedule=))")

    problems = _check_base(model, document)
    present = adapter_modules(model)
    if present and set(present) != set(document["layers"]):
        problems.append(f"the model already holds adapter layers at other modules (extra: "
                        f"{_list(set(present) - set(document['layers'])) or 'none'}; missing: "
                        f"{_list(set(document['layers']) - set(present)) or 'none'})")
    if problems:
        raise ValueError(f"fastcur.load_adapter: the model is not the base this adapter was saved for "
                         f"({directory}): " + "; ".join(problems))

    tensors = _read_tensors(directory, document)
    listed = {f"{name}.{key}" for name, info in document["layers"].items() for key in info["tensors"]}
    listed |= {g["key"] for g in document.get("jump_thresholds", [])}
    missing, extra = listed - set(tensors), set(tensors) - listed
    if missing or extra:
        raise ValueError(f"fastcur.load_adapter: {os.path.join(directory, WEIGHTS_NAME)} does not hold the "
                         f"tensors {CONFIG_NAME} lists; missing keys: {_list(missing) or 'none'}; "
                         f"unexpected keys: {_list(extra) or 'none'}")

    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers = _build_layers(model, document, cls, tensors, present)
    except BaseException:
        for p, flag in grad_state:       # from_linear froze base weights of layers never put in
            p.requires_grad_(flag)
        raise
    for name, layer in layers.items():
        if name not in present:
            _set_module(model, name, layer)
    freeze_base(model)
    setattr(model, CONFIG_ATTR, config)
    if merge_schedule is not None:
        merge_schedule.load_state_dict(document["merge_schedule"])
    return outer


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
                layer = cls.layer_class.from_linear(linear, **options)  # reads W, writes nothing of it
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
    for name, layer, own, state in loads:
        _fill(layer, own, state)
        if isinstance(layer, JumpLoRALinear):
            layer.f = document["layers"][name]["options"]["f"]
    for threshold, value in thresholds.values():
        threshold.log_theta.copy_(value)
    for name, layer, own, state in loads:
        if state.get("merged") and not layer.merged:
            layer.merge()
    return layers


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
