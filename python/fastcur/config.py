"""Adapter configs of the model-level API: one dataclass per method, PEFT-style.

    config = fastcur.SecuraConfig(rank=8, target_modules=["q_proj", "v_proj"])
    fastcur.inject(model, config)

Every config has `.method` (its name in `fastcur_adapter.json`), `.layer_class` (the module it
injects), `.to_dict()` / `AdapterConfig.from_dict(d)` (dispatch on "method"),
`.layer_options()` (the keyword arguments of `layer_class.from_linear`) and
`options_of(layer)` (the same keyword arguments read back from a built layer).

`target_modules`:
- a list of names: a module matches when its qualified name equals an entry or ends with
  "." + the entry (whole name components, as PEFT: "proj" does not match "q_proj");
- a string: a regular expression that must match the whole qualified name (`re.fullmatch`);
- "all-linear": every nn.Linear except the output head (`model.get_output_embeddings()` for
  transformers models, else a module named `lm_head`).
A new method plugs in by subclassing `AdapterConfig` with a `method` and a `layer_class`.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .modules.cur_lora_linear import CURLoRALinear
from .modules.jump_lora_linear import DEFAULT_LOG_THETA, GATES, SCOPES, JumpLoRALinear
from .modules.lora_linear import LoRALinear
from .modules.secura_linear import SecuraLinear

ALL_LINEAR = "all-linear"
_REGISTRY: dict[str, type["AdapterConfig"]] = {}


def _check_int(cls: str, name: str, value, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"fastcur.{cls}: {name} must be an int >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")


def _check_float(cls: str, name: str, value, low: float | None = None, high: float | None = None,
                 open_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        bounds = "" if low is None and high is None else (
            f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}"
            f"{')' if open_high else ']'}")
        raise ValueError(f"fastcur.{cls}: {name} must be a number{bounds}, got {value!r}")


def _check_choice(cls: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"fastcur.{cls}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_bool(cls: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"fastcur.{cls}: {name} must be a bool, got {value!r}")


def check_target_modules(cls: str, target_modules, arg: str = "target_modules") -> list[str] | str:
    """Validate `target_modules` (or another module selection named `arg`); returns it as a list
    of str or a str (a compiled-checked regex)."""
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"fastcur.{cls}: {arg}={target_modules!r} is a string, so it is "
                                 f"read as a regular expression, but it does not compile: {e}") from None
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules \
            and all(isinstance(t, str) and t for t in target_modules):
        return sorted(target_modules) if isinstance(target_modules, (set, frozenset)) else list(target_modules)
    raise ValueError(f"fastcur.{cls}: {arg} must be a non-empty list of module name suffixes, "
                     f"a regex string, or 'all-linear', got {target_modules!r}")


def matches(name: str, target_modules: list[str] | str) -> bool:
    """Whether the qualified module `name` is named by `target_modules` (see the module doc;
    "all-linear" matches every name: the caller excludes the output head)."""
    if target_modules == ALL_LINEAR:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


@dataclass
class AdapterConfig:
    """The base of every config: `method`, `layer_class` and the shared (de)serialization.

    `modules_to_save` (keyword only, every method; default None): modules trained in full
    beside the adapter (e.g. ["lm_head"]), named as in `target_modules` (a list of name
    suffixes or a regex). `fastcur.inject` puts a trainable copy of each in place (the
    original stays with the base model, as PEFT does), `save_adapter` stores their tensors
    and `load_adapter` restores them.
    """

    modules_to_save: list[str] | str | None = field(default=None, kw_only=True)

    method: ClassVar[str] = ""
    layer_class: ClassVar[type[nn.Module]]
    # layer option name -> attribute of the built layer holding it, where the two differ
    _layer_attrs: ClassVar[dict[str, str]] = {}
    # fields of the config that are not keyword arguments of layer_class.from_linear
    _not_layer_options: ClassVar[tuple[str, ...]] = ("target_modules",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # modules_to_save is the model's business, never a layer option (also for subclasses
        # that set their own _not_layer_options)
        if "modules_to_save" not in cls._not_layer_options:
            cls._not_layer_options = (*cls._not_layer_options, "modules_to_save")
        if cls.method:
            _REGISTRY[cls.method] = cls

    def __post_init__(self):
        self.target_modules = check_target_modules(type(self).__name__, self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = check_target_modules(type(self).__name__, self.modules_to_save,
                                                        arg="modules_to_save")
            if self.modules_to_save == ALL_LINEAR:
                raise ValueError(f"fastcur.{type(self).__name__}: modules_to_save='all-linear' would train "
                                 f"the whole model; name the modules (e.g. ['lm_head'])")
        self._validate()

    def _validate(self) -> None:
        """Check the method's options (subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        """{"method": ..., every field}: JSON-serializable, the inverse of `from_dict`."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "AdapterConfig":
        """The config a `to_dict()` wrote; the class is picked by d["method"]."""
        if not isinstance(d, dict):
            raise TypeError(f"fastcur.AdapterConfig.from_dict: expected a dict, got {type(d).__name__}")
        method = d.get("method")
        if method not in _REGISTRY:
            raise ValueError(f"fastcur.AdapterConfig.from_dict: unknown method {method!r}; known: "
                             f"{', '.join(sorted(_REGISTRY))}")
        cls = _REGISTRY[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"method"})
        if unknown:
            raise ValueError(f"fastcur.{cls.__name__}.from_dict: unknown option(s) {unknown}; "
                             f"known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k != "method"})

    def layer_options(self) -> dict[str, Any]:
        """Keyword arguments of `layer_class.from_linear` (every field but target_modules...)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self._not_layer_options}

    @classmethod
    def options_of(cls, layer: nn.Module) -> dict[str, Any]:
        """The `from_linear` keyword arguments that rebuild `layer` (read from its attributes)."""
        if not isinstance(layer, cls.layer_class):
            raise TypeError(f"fastcur.{cls.__name__}.options_of: expected a {cls.layer_class.__name__}, "
                            f"got {type(layer).__name__}")
        return {f.name: getattr(layer, cls._layer_attrs.get(f.name, f.name))
                for f in dataclasses.fields(cls) if f.name not in cls._not_layer_options}


def config_class(method: str) -> type[AdapterConfig]:
    """The config class of `method` ("lora", "curlora", "secura", "jumplora", ...)."""
    if method not in _REGISTRY:
        raise ValueError(f"fastcur: unknown adapter method {method!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[method]


def _unwrapped_type(layer: nn.Module) -> type:
    """type(layer), or the class FSDP2's `fully_shard` swapped out: it gives a sharded module the
    dynamic class `FSDP<Cls>(FSDPModule, Cls)`."""
    kind = type(layer)
    bases = kind.__bases__
    # Not imported here (0.6 s): a model fully_shard has wrapped means the module is loaded.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and len(bases) == 2 and bases[0] is getattr(fsdp, "FSDPModule", None):
        return bases[1]
    return kind


def config_class_of_layer(layer: nn.Module) -> type[AdapterConfig]:
    """The config class whose `layer_class` is exactly `type(layer)` (seen through FSDP2)."""
    kind = _unwrapped_type(layer)
    for cls in _REGISTRY.values():
        if kind is cls.layer_class:
            return cls
    raise TypeError(f"fastcur: no adapter config describes a {type(layer).__name__} layer; known layer "
                    f"classes: {', '.join(c.layer_class.__name__ for c in _REGISTRY.values())}")


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA (`fastcur.LoRALinear`, PEFT-compatible): s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] | str = ALL_LINEAR

    method: ClassVar[str] = "lora"
    layer_class: ClassVar[type[nn.Module]] = LoRALinear

    def _validate(self) -> None:
        name = type(self).__name__
        _check_int(name, "rank", self.rank)
        _check_float(name, "alpha", self.alpha)
        _check_float(name, "dropout", self.dropout, 0.0, 1.0, open_high=True)
        _check_bool(name, "use_rslora", self.use_rslora)

    @classmethod
    def options_of(cls, layer: nn.Module) -> dict[str, Any]:
        if not isinstance(layer, LoRALinear):
            raise TypeError(f"fastcur.LoRAConfig.options_of: expected a LoRALinear, got {type(layer).__name__}")
        p = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
        return dict(rank=layer.rank, alpha=layer.alpha, dropout=p, use_rslora=layer.use_rslora)


@dataclass
class CURLoRAConfig(AdapterConfig):
    """CUR-LoRA (`fastcur.CURLoRALinear`): C, R selected from W (`select`, seeded per layer from
    `seed` and the layer's qualified name), U trained. `inverse_eps`: e of the inverted
    probabilities 1/(p + e) (0.001 as released; 0 is the paper's 1/p). See docs/methods.md."""
    rank: int = 8
    scale: float = 1.0
    select: str = "sample"
    replace: bool = False
    inverse_eps: float = 1e-3
    seed: int = 0
    target_modules: list[str] | str = ALL_LINEAR

    method: ClassVar[str] = "curlora"
    layer_class: ClassVar[type[nn.Module]] = CURLoRALinear
    _layer_attrs: ClassVar[dict[str, str]] = {"select": "selection"}

    def _validate(self) -> None:
        name = type(self).__name__
        _check_int(name, "rank", self.rank)
        _check_float(name, "scale", self.scale)
        _check_choice(name, "select", self.select, ("sample", "lowest"))
        _check_bool(name, "replace", self.replace)
        _check_float(name, "inverse_eps", self.inverse_eps, 0.0)
        _check_int(name, "seed", self.seed, minimum=0)


@dataclass
class SecuraConfig(AdapterConfig):
    """SECURA (`fastcur.SecuraLinear`): CABR-LoRA + SigNorm; see SecuraLinear for each option and
    docs/methods.md for each default's source."""
    rank: int = 8
    inner_rank: int | None = None
    scale: float = 1.0
    init: str = "svd"
    lora_bias: bool = False
    signorm: str = "output"
    norm: str = "max"
    scope: str = "token"
    k: float = 6.0
    eps: float = 1e-10
    restrain: bool = False
    restrain_min: float = 1.2
    restrain_ratio: float = 0.9
    restrain_decay: float = 0.99
    restrain_rule: str = "fastcur"
    merge_mode: str = "plain"
    merge_scope: str = "row"
    merge_every: int | None = None
    reselect_on_merge: bool = False
    fold_lora_bias: bool = False
    seed: int = 0
    target_modules: list[str] | str = ALL_LINEAR

    method: ClassVar[str] = "secura"
    layer_class: ClassVar[type[nn.Module]] = SecuraLinear

    def _validate(self) -> None:
        name = type(self).__name__
        _check_int(name, "rank", self.rank)
        _check_int(name, "inner_rank", self.inner_rank, allow_none=True)
        for arg in ("scale", "k", "restrain_min", "restrain_decay"):
            _check_float(name, arg, getattr(self, arg))
        _check_float(name, "eps", self.eps, 0.0)
        _check_float(name, "restrain_ratio", self.restrain_ratio, 0.0, 1.0)
        _check_choice(name, "init", self.init, ("svd", "kaiming"))
        _check_choice(name, "signorm", self.signorm, ("output", "off"))
        _check_choice(name, "norm", self.norm, ("max", "raw"))
        _check_choice(name, "scope", self.scope, ("token", "tensor"))
        _check_choice(name, "merge_mode", self.merge_mode, ("plain", "signorm"))
        _check_choice(name, "merge_scope", self.merge_scope, ("row", "tensor"))
        _check_choice(name, "restrain_rule", self.restrain_rule, ("fastcur", "released"))
        _check_int(name, "merge_every", self.merge_every, allow_none=True)
        for arg in ("lora_bias", "restrain", "reselect_on_merge", "fold_lora_bias"):
            _check_bool(name, arg, getattr(self, arg))
        _check_int(name, "seed", self.seed, minimum=0)

    @classmethod
    def options_of(cls, layer: nn.Module) -> dict[str, Any]:
        if not isinstance(layer, SecuraLinear):
            raise TypeError(f"fastcur.SecuraConfig.options_of: expected a SecuraLinear, got {type(layer).__name__}")
        # lora_bias is a Parameter or None on the layer, a bool as an option
        return {f.name: (layer.lora_bias is not None) if f.name == "lora_bias" else getattr(layer, f.name)
                for f in dataclasses.fields(cls) if f.name not in cls._not_layer_options}


@dataclass
class JumpLoRAConfig(AdapterConfig):
    """JumpLoRA (`fastcur.JumpLoRALinear`): s = alpha / r, JumpReLU-gated update.

    `threshold_scope`: which layers share one `JumpThreshold`: "global" (default, the paper's:
    one θ for every injected layer), "per_block" (one per transformer block, by the released
    name rule `fastcur.modules.jump_lora_linear.threshold_group_key`) or "per_layer".
    `f` starts at 0 (as released: a plain training loop learns); `total_steps` (the run's
    optimizer steps) runs the f schedule on its own from the optimizer's steps (ramp from
    `f_start` to `f_end` of the steps, θ reset at its start; docs/methods.md).
    `ella_delta`: what ELLA penalizes ("interpolated" as released, "masked", "sparse").
    """
    rank: int = 8
    alpha: float = 32.0
    gate: str = "weight"
    f: float = 0.0
    bandwidth: float = 1e-3
    reduction: str = "mean"
    init_log_theta: float = DEFAULT_LOG_THETA
    threshold_scope: str = "global"
    total_steps: int | None = None
    f_start: float = 0.2
    f_end: float = 0.8
    ella_delta: str = "interpolated"
    target_modules: list[str] | str = ALL_LINEAR

    method: ClassVar[str] = "jumplora"
    layer_class: ClassVar[type[nn.Module]] = JumpLoRALinear
    _not_layer_options: ClassVar[tuple[str, ...]] = ("target_modules", "threshold_scope")

    def _validate(self) -> None:
        name = type(self).__name__
        _check_int(name, "rank", self.rank)
        _check_float(name, "alpha", self.alpha)
        _check_choice(name, "gate", self.gate, GATES)
        _check_float(name, "f", self.f, 0.0, 1.0)
        _check_float(name, "bandwidth", self.bandwidth)
        if not self.bandwidth > 0:
            raise ValueError(f"fastcur.{name}: bandwidth must be > 0, got {self.bandwidth!r}")
        _check_choice(name, "reduction", self.reduction, ("mean", "sum"))
        _check_float(name, "init_log_theta", self.init_log_theta)
        _check_choice(name, "threshold_scope", self.threshold_scope, SCOPES)
        _check_int(name, "total_steps", self.total_steps, allow_none=True)
        _check_float(name, "f_start", self.f_start, 0.0, 1.0)
        _check_float(name, "f_end", self.f_end, self.f_start, 1.0)
        _check_choice(name, "ella_delta", self.ella_delta, ("interpolated", "masked", "sparse"))
        if self.total_steps is not None and (self.gate != "weight" or self.f != 0.0):
            raise ValueError(f"fastcur.{name}: total_steps runs the f schedule of the weight gate, which "
                             f"starts at f = 0; got gate={self.gate!r}, f={self.f!r}")

    @classmethod
    def options_of(cls, layer: nn.Module) -> dict[str, Any]:
        if not isinstance(layer, JumpLoRALinear):
            raise TypeError(f"fastcur.JumpLoRAConfig.options_of: expected a JumpLoRALinear, "
                            f"got {type(layer).__name__}")
        # init_log_theta is left out: the threshold is shared and passed in (its value is state)
        return dict(rank=layer.rank, alpha=layer.alpha, gate=layer.gate, f=layer.fixed_f,
                    bandwidth=layer.bandwidth, reduction=layer.reduction, total_steps=layer.total_steps,
                    f_start=layer.f_start, f_end=layer.f_end, ella_delta=layer.ella_delta)
