"""PEFT interop: a PEFT LoRA adapter directory into fastcur `LoRALinear` layers, and back.

    model = fastcur.load_peft_adapter(base_model, "peft_adapter_dir")   # same outputs as PEFT's
    fastcur.export_peft_adapter(model, "out")   # peft.PeftModel.from_pretrained(base, "out") loads it

A PEFT LoRA directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, ...) and
`adapter_model.safetensors` (or the older `adapter_model.bin`) with keys
`base_model.model.<module name>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r]. Which
modules carry adapters is read from the keys; each layer's rank from its tensors and its
alpha from `alpha_pattern` (PEFT's rule: the first pattern `p` with
`re.match(rf"(.*\\.)?({p})$", name)`), else `lora_alpha`. PEFT features fastcur's LoRALinear does
not compute (DoRA, LoRA bias, fan_in_fan_out/Conv1D, modules_to_save, embedding or conv LoRA,
trainable tokens, ...) are refused with an error naming them, never dropped silently.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from .config import LoRAConfig
from .inject import adapter_modules, unwrap
from .modules.lora_linear import LoRALinear
from .named_adapters import DEFAULT_ADAPTER, add, check_adapter_name, check_unmerged, show, store_of
from ._atomic import atomic_folder
from .adapter_files import ADAPTER_FILES, load_json

PREFIX = "base_model.model."
SUFFIXES = (".lora_A.weight", ".lora_B.weight")
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_NAME = "adapter_config.json"
# PEFT options that change what a LoRA layer computes or what the adapter holds; fastcur's
# LoRALinear computes none of them, so a directory that sets one is refused.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "layer_replication",
               "target_parameters", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
               "use_bdlora", "kasa_config", "arrow_config", "monteclora_config", "velora_config",
               "megatron_config")


def _pattern_value(patterns: dict[str, Any], name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastcur.load_peft_adapter: {path} is missing (not a PEFT adapter directory)")
    config = load_json(path, "fastcur.load_peft_adapter")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        hint = " (a fastcur adapter: use fastcur.load_adapter)" if isinstance(config, dict) and \
            (config.get("format") == "fastcur-adapter" or "fastcur_config" in config) else ""
        raise ValueError(f"fastcur.load_peft_adapter: {path} is not a PEFT LoRA config (peft_type = "
                         f"{found!r}, expected 'LORA'){hint}")
    bad = [k for k in UNSUPPORTED if config.get(k) not in (None, False, [], {}, "")]
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r}")
    if bad:
        raise ValueError(f"fastcur.load_peft_adapter: {path} uses PEFT features fastcur's LoRALinear does not "
                         f"compute: {', '.join(bad)}")
    return config


def _read_peft_tensors(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    for name in WEIGHTS_NAMES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return path, load_file(path)
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors / torch raise their own types for a damaged file
            raise ValueError(f"fastcur.load_peft_adapter: {path} cannot be read ({e}); the file is corrupt "
                             f"or truncated") from None
    raise FileNotFoundError(f"fastcur.load_peft_adapter: {directory} holds neither "
                            f"{' nor '.join(WEIGHTS_NAMES)}")


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, *,
                      adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Put `LoRALinear` layers holding a PEFT LoRA adapter into `model` (its base model: the
    module PEFT wrapped, not a PeftModel) and return it; outputs equal PEFT's on the same base.
    Freezes everything but the LoRA tensors, as `fastcur.inject` does, and records a
    `LoRAConfig` (r, lora_alpha, lora_dropout, use_rslora; target_modules = the modules).
    `adapter_name` (default "default"): the name it gets beside the model's other fastcur
    adapters (`fastcur.named_adapters`); it becomes the active one. On error the model is left
    as it was."""
    caller = "fastcur.load_peft_adapter"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    if type(model).__name__.startswith("PeftModel") or hasattr(model, "peft_config"):
        raise TypeError(f"{caller}: model is a PEFT model; pass the base model "
                        "(peft_model.get_base_model() after unloading, or a fresh one)")
    adapter_name = check_adapter_name(adapter_name, caller)
    store = store_of(model)
    previous = store.active if store is not None else None
    if store is not None:
        if adapter_name in store.adapters:
            raise ValueError(f"{caller}: the model already holds an adapter named {adapter_name!r}; pass another "
                             f"adapter_name, or fastcur.delete_adapter(model, {adapter_name!r}) first")
        check_unmerged(store, caller)
        show(model, store, None)          # the PEFT adapter goes onto the base modules
    try:
        config, built = _peft_layers(model, os.fspath(directory))
    except BaseException:
        if store is not None:
            show(model, store, previous)
        raise
    add(model, adapter_name, config, built, {})
    return model


def _peft_layers(model: nn.Module, directory: str) -> tuple[LoRAConfig, dict[str, LoRALinear]]:
    """The LoRAConfig and LoRALinear layers (built off the model) of a PEFT LoRA directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"fastcur.load_peft_adapter: no adapter directory at {directory!r}")
    config = _read_peft_config(directory)
    path, tensors = _read_peft_tensors(directory)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    strange = []
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            strange.append(key)
            continue
        pairs.setdefault(key[len(PREFIX):-len(suffix)], {})[suffix[1:]] = value
    if strange:
        shown = ", ".join(sorted(strange)[:6]) + (", ..." if len(strange) > 6 else "")
        raise ValueError(f"fastcur.load_peft_adapter: {path} holds tensors other than "
                         f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight' (embedding or conv LoRA, "
                         f"DoRA, trained biases, modules_to_save?): {shown}")
    if not pairs:
        raise ValueError(f"fastcur.load_peft_adapter: {path} holds no LoRA tensors")

    problems, layers = [], {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A.weight", "lora_B.weight"}:
            missing = {"lora_A.weight", "lora_B.weight"} - set(pair)
            problems.append(f"module {name!r} lacks {', '.join(sorted(missing))}")
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name!r} does not exist in the model")
            continue
        if not isinstance(linear, nn.Linear):
            problems.append(f"module {name!r} is a {type(linear).__name__}, not an nn.Linear")
            continue
        A, B = pair["lora_A.weight"], pair["lora_B.weight"]
        r = A.shape[0]
        want = _pattern_value(config.get("rank_pattern"), name, config.get("r", r))
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, linear.in_features) \
                or tuple(B.shape) != (linear.out_features, r) or r != want:
            problems.append(f"module {name!r} (in_features={linear.in_features}, out_features="
                            f"{linear.out_features}, rank {want}) needs lora_A [{want}, {linear.in_features}] "
                            f"and lora_B [{linear.out_features}, {want}], got {list(A.shape)} and {list(B.shape)}")
            continue
        layers[name] = (linear, r, A, B)
    if problems:
        raise ValueError(f"fastcur.load_peft_adapter: the adapter in {directory} does not fit this model: "
                         + "; ".join(problems))

    built = {}
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name, (linear, r, A, B) in layers.items():
            alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
            layer = LoRALinear.from_linear(linear, rank=r, alpha=float(alpha),
                                           dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                                           use_rslora=bool(config.get("use_rslora", False)))
            with torch.no_grad():
                layer.lora_A.weight.copy_(A)
                layer.lora_B.weight.copy_(B)
            built[name] = layer
    except BaseException:
        for p, flag in grad_state:
            p.requires_grad_(flag)
        raise
    return LoRAConfig(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                      dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                      use_rslora=bool(config.get("use_rslora", False)), target_modules=list(built)), built


def _exact_pattern(name: str) -> str:
    # PEFT matches `(.*\.)?(<key>)$`; "^" + the escaped name matches this module only
    return "^" + re.escape(name)


def export_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, task_type: str | None = None) -> str:
    """Write the `LoRALinear` layers of `model` as a PEFT LoRA adapter directory
    (`adapter_config.json` + `adapter_model.safetensors`, atomic writes) that
    `peft.PeftModel.from_pretrained(base_model, directory)` loads with the same outputs.
    `target_modules` lists the exact module names; layers whose rank or alpha differ from the
    most common go into `rank_pattern` / `alpha_pattern`. `task_type`: PEFT's (e.g.
    "CAUSAL_LM"), None by default. Only LoRA exports (PEFT has no CUR-LoRA, SECURA or
    JumpLoRA); merged layers must be unmerged first. Both files are switched in together
    (`fastcur._atomic.atomic_folder`): a crash leaves the old export or the new one.
    Returns the directory path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcur.export_peft_adapter: model must be an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    layers = adapter_modules(model)
    if not layers:
        raise ValueError("fastcur.export_peft_adapter: the model has no fastcur adapter layer")
    other = {n: type(m).__name__ for n, m in layers.items() if type(m) is not LoRALinear}
    if other:
        name, cls = next(iter(other.items()))
        raise ValueError(f"fastcur.export_peft_adapter: only LoRALinear layers export to PEFT (PEFT has no "
                         f"equivalent of the others); module {name!r} is a {cls}")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"fastcur.export_peft_adapter: module(s) {', '.join(merged[:4])} are merged; PEFT "
                         f"loads adapters onto an unmerged base: call fastcur.unmerge(model) first")
    rslora = {m.use_rslora for m in layers.values()}
    dropout = {(m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0) for m in layers.values()}
    for what, values in (("use_rslora", rslora), ("dropout", dropout)):
        if len(values) > 1:
            raise ValueError(f"fastcur.export_peft_adapter: PEFT has one {what} per adapter, the layers use "
                             f"{sorted(values)}")
    r = Counter(m.rank for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "lora_dropout": dropout.pop(), "use_rslora": rslora.pop(), "target_modules": list(layers),
        "rank_pattern": {_exact_pattern(n): m.rank for n, m in layers.items() if m.rank != r},
        "alpha_pattern": {_exact_pattern(n): m.alpha for n, m in layers.items() if m.alpha != alpha},
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu", copy=True).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu", copy=True).contiguous()
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"fastcur.export_peft_adapter: directory {directory!r} exists and is not a folder")
    from safetensors.torch import save_file
    # both files switch in together (a fresh folder and one rename); a fastcur adapter that
    # was in the folder is replaced, other files stay
    with atomic_folder(directory, replaces=ADAPTER_FILES) as staging:
        save_file(tensors, os.path.join(staging, WEIGHTS_NAMES[0]), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2) + "\n")
    return directory
