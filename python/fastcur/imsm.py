"""IMSM (docs/methods.md, "IMSM"): interweave the memories of the frozen and the adapted model,
one model copy.

    model = fastcur.inject(LlamaForCausalLM(config), fastcur.LoRAConfig(rank=8))
    imsm = fastcur.IMSM(model, gate_rank=8, gate_dropout=0.1)
    out = imsm(input_ids, attention_mask, prompt_lengths=prompt_lengths, labels=labels)
    out.loss.backward()                       # adapters + W_A, W_B get gradients
    tokens = imsm.generate(prompt_ids, max_new_tokens=32)

Both streams run as ONE batched forward of the same model: the batch is doubled and every
fastcur adapter layer gets `frozen_batch_rows = B`, so rows [:B] are the frozen model (adapters
bypassed) and rows [B:] the adapted one. The final hidden states (after the final norm) of the
two halves are the memories h and h'; their means over the prompt tokens are the queries q, q';
`fastcur.ops.imsm_gate` mixes them and the frozen LM head gives the logits.

The frozen stream has no trainable tensor upstream, so it is run without gradient bookkeeping
where the layers allow it (the adapter layers cut the graph at the frozen rows) and h, q enter
the gate detached: the gradients of every trainable tensor are those of the two-copy model.
As in the released code, the frozen stream runs as in eval mode (no dropout) while the tuned
one trains, and the gate W_A, W_B are float32 on a bfloat16/float16 model.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._atomic import atomic_folder
from ._hf_compat import cache_keyword, new_cache
from .modules.adapter_linear import AdapterLinear
from .ops.imsm_gate import imsm_gate

GATE_WEIGHTS = "imsm_gate.safetensors"
GATE_CONFIG = "imsm_config.json"
TRAIN_STREAMS = ("auto", "batched", "sequential")
DROPOUT_AT = ("both", "hidden")
GATE_INITS = ("zeros", "linear")


@dataclass
class IMSMOutput:
    """loss: next-token cross-entropy over answer tokens (None without labels);
    logits: [B, T, vocab] from the interwoven hidden states."""
    loss: torch.Tensor | None
    logits: torch.Tensor


def _adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack whose output is the final-normed hidden state, and the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = None
    if hasattr(model, "get_decoder"):
        backbone = model.get_decoder()
    if backbone is None or backbone is model:
        backbone = getattr(model, "model", None)
    if backbone is None or head is None:
        raise TypeError(f"fastcur.IMSM: expected a transformers causal LM with a decoder (`model.model` / "
                        f"`get_decoder()`) and an LM head (`get_output_embeddings()`), got {type(model).__name__}")
    return backbone, head


class IMSM(nn.Module):
    """IMSM around a causal LM whose linear layers carry fastcur adapters (any method).

    Trainable: the adapters' tensors and the gate `W_A` [4d, gate_rank] (kaiming, as a Linear
    of 4d inputs) and `W_B` [gate_rank, d]: zeros with `gate_init="zeros"` (default, the gate
    is exactly 0.5 at init, a recorded Decision), or a Linear's kaiming init with
    `gate_init="linear"` (the released code). The gate is float32 whatever the
    model's dtype (float64 on a float64 model); the mixed hidden state goes to the LM head in
    the model's dtype, as the released code does.

    `gate_dropout` (0.1 as released; training only) where `gate_dropout_at` puts it:
    "both" (default, the released gate: after W_A on the gate_rank-wide hidden and after W_B on
    the d-wide pre-sigmoid gate; the second mask runs the gate unfused in training) or "hidden"
    (after W_A only: the fused gate kernel in training too).

    `train_streams`: how a training-mode forward runs the two streams. "sequential": the frozen
    stream in eval mode under no_grad, then the tuned one, the same weights: no autograd state
    for the frozen rows, so less activation memory and backward work. "batched": one pass over
    the doubled batch (refused in training when the base model has active dropout, which would
    reach the frozen rows). "auto" (default): sequential on the CPU, where it measured faster
    and leaner, and wherever the base model has active dropout; batched elsewhere. In eval mode
    (evaluation, `generate`) both streams always run batched.

    A training-mode forward needs the prompt: `prompt_lengths` or `prompt_mask` (without them
    the query means would average over the answer tokens too); it raises without them.
    """

    def __init__(self, model: nn.Module, gate_rank: int = 8, gate_dropout: float = 0.1,
                 train_streams: str = "auto", gate_dropout_at: str = "both", gate_init: str = "zeros"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastcur.IMSM: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(gate_rank, int) or isinstance(gate_rank, bool) or gate_rank < 1:
            raise ValueError(f"fastcur.IMSM: gate_rank must be a positive int, got {gate_rank!r}")
        if not isinstance(gate_dropout, (int, float)) or not 0.0 <= gate_dropout < 1.0:
            raise ValueError(f"fastcur.IMSM: gate_dropout must be in [0, 1), got {gate_dropout!r}")
        if train_streams not in TRAIN_STREAMS:
            raise ValueError(f"fastcur.IMSM: train_streams must be 'auto', 'batched' or 'sequential', got {train_streams!r}")
        if gate_dropout_at not in DROPOUT_AT:
            raise ValueError(f"fastcur.IMSM: gate_dropout_at must be 'both' or 'hidden', got {gate_dropout_at!r}")
        if gate_init not in GATE_INITS:
            raise ValueError(f"fastcur.IMSM: gate_init must be 'zeros' or 'linear', got {gate_init!r}")
        self.train_streams, self.gate_dropout_at, self.gate_init = train_streams, gate_dropout_at, gate_init
        self.adapters = _adapter_layers(model)
        if not self.adapters:
            raise ValueError("fastcur.IMSM: the model has no fastcur adapter layers (AdapterLinear); "
                             "add adapters first, e.g. fastcur.inject(model, fastcur.LoRAConfig())")
        self.model = model
        _backbone_and_head(model)  # fails early on a model that is not a causal LM
        d = model.config.hidden_size
        weight = self.head.weight
        self.hidden_size, self.gate_rank, self.gate_dropout = d, gate_rank, float(gate_dropout)
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32 on a half model
        self.W_A = nn.Parameter(torch.empty(4 * d, gate_rank, device=weight.device, dtype=dtype))
        self.W_B = nn.Parameter(torch.zeros(gate_rank, d, device=weight.device, dtype=dtype))
        self.reset_gate()

    @property
    def backbone(self) -> nn.Module:
        return _backbone_and_head(self.model)[0]

    @property
    def head(self) -> nn.Module:
        return _backbone_and_head(self.model)[1]

    @torch.no_grad()
    def reset_gate(self) -> None:
        """W_A: nn.Linear(4d, r_g)'s kaiming init (bound 1/sqrt(4d)); W_B: zeros (g = 0.5,
        gate_init="zeros") or nn.Linear(r_g, d)'s init (bound 1/sqrt(r_g), gate_init="linear")."""
        for W, fan_out in ((self.W_A, self.gate_rank), (self.W_B, self.hidden_size)):
            if W is self.W_B and self.gate_init == "zeros":
                W.zero_()
                continue
            w = torch.empty(fan_out, W.shape[0], dtype=torch.float32)  # a Linear's [out, in] weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            W.copy_(w.t())

    # -- the two streams in one batch ---------------------------------------------------------
    @contextlib.contextmanager
    def _frozen_rows(self, rows: int):
        self._check_unmerged()
        saved = [(m, m.frozen_batch_rows, m.detach_frozen_rows) for m in self.adapters.values()]
        for m in self.adapters.values():
            m.frozen_batch_rows, m.detach_frozen_rows = rows, True
        try:
            yield
        finally:
            for m, r, det in saved:
                m.frozen_batch_rows, m.detach_frozen_rows = r, det

    def _check_unmerged(self) -> None:
        merged = [name for name, m in self.adapters.items() if m.merged]
        if merged:
            raise RuntimeError(f"fastcur.IMSM: the frozen stream needs unmerged adapters, but {merged[0]} "
                               f"is merged; call unmerge() first")

    def streams(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False):
        """One batched pass of both streams: input_ids [B, T] -> (h [B, T, d] frozen, detached;
        h_tuned [B, T, d]; the cache of the doubled batch or None)."""
        B = input_ids.shape[0]
        two = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        backbone = self.backbone
        cache_kw = cache_keyword(type(backbone))
        with self._frozen_rows(B):
            out = backbone(input_ids=two(input_ids), attention_mask=two(attention_mask),
                           position_ids=two(position_ids), use_cache=use_cache, **{cache_kw: past_key_values})
        hs = out.last_hidden_state
        return hs[:B].detach(), hs[B:], (getattr(out, cache_kw) if use_cache else None)

    def _sequential_streams(self, input_ids, attention_mask):
        """train_streams="sequential": the frozen stream first, in eval mode (no dropout) under
        no_grad with the adapters off (same weights), then the tuned stream in the model's own
        mode: no autograd state for the frozen rows."""
        self._check_unmerged()
        layers = list(self.adapters.values())
        saved = [m.adapter_enabled for m in layers]
        backbone = self.backbone
        modes = [(m, m.training) for m in backbone.modules()]
        try:
            for m in layers:
                m.adapter_enabled = False
            backbone.eval()
            with torch.no_grad():
                h = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            for m, on in zip(layers, saved):
                m.adapter_enabled = on
            for m, mode in modes:
                m.training = mode
        h_tuned = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h, h_tuned

    def _runs_sequential(self) -> bool:
        """Whether this forward runs the streams one after the other (see `train_streams`)."""
        if not self.training:
            return False
        if self.train_streams == "sequential":
            return True
        dropout = _active_dropout(self.backbone)
        if self.train_streams == "batched":
            if dropout is not None:
                raise ValueError(f"fastcur.IMSM: train_streams='batched' would apply the base model's dropout "
                                 f"({dropout}) to the frozen stream, which runs as in eval mode; use "
                                 f"train_streams='sequential' (or 'auto'), or set that dropout to 0")
            return False
        return dropout is not None or self.W_A.device.type == "cpu"

    def interweave(self, h: torch.Tensor, h_tuned: torch.Tensor, q: torch.Tensor,
                   q_tuned: torch.Tensor) -> torch.Tensor:
        """The gate and the frozen LM head: h, h_tuned [B, T, d], q, q_tuned [B, d] -> logits
        [B, T, vocab]. Gate dropout in training mode, where `gate_dropout_at` puts it."""
        hidden_mask = gate_mask = None
        if self.training and self.gate_dropout > 0:
            hidden_mask = self._dropout_mask((*h.shape[:2], self.gate_rank), h.device)
            if self.gate_dropout_at == "both":
                gate_mask = self._dropout_mask((*h.shape[:2], self.hidden_size), h.device)
        mixed = imsm_gate(h, h_tuned, q, q_tuned, self.W_A, self.W_B, hidden_mask, gate_mask=gate_mask)
        if isinstance(self.head, AdapterLinear):  # the LM head stays frozen (docs/methods.md, IMSM)
            return F.linear(mixed, self.head.weight, self.head.bias)
        return self.head(mixed)

    def _dropout_mask(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """nn.Dropout's mask: 0 with probability p, else 1 / (1 - p), in the gate's dtype."""
        keep = 1.0 - self.gate_dropout
        return torch.bernoulli(torch.full(shape, keep, device=device, dtype=self.W_A.dtype)).div_(keep)

    # -- training forward ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None) -> IMSMOutput:
        """input_ids [B, T] (right padding); attention_mask [B, T] or None; the prompt is the
        first `prompt_lengths[b]` tokens of row b, or the True entries of `prompt_mask` [B, T]
        (required in training mode; in eval mode the default is every attended token); labels
        [B, T] with -100 outside the answer tokens (shifted inside, as transformers does).
        Returns `IMSMOutput(loss, logits)`."""
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        if self.training and prompt_lengths is None and prompt_mask is None:
            raise ValueError("fastcur.IMSM: a training-mode forward needs prompt_lengths (or prompt_mask): without "
                             "them the query means q, q' average over the answer tokens too; pass "
                             "prompt_lengths=[B] prompt sizes, or call .eval() for evaluation")
        pm = self._prompt_mask(input_ids, attention_mask, prompt_lengths, prompt_mask)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"fastcur.IMSM: labels must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
        if self._runs_sequential():
            h, h_tuned = self._sequential_streams(input_ids, attention_mask)
        else:
            h, h_tuned, _ = self.streams(input_ids, attention_mask)
        q, q_tuned = _masked_mean(h, pm), _masked_mean(h_tuned, pm)
        logits = self.interweave(h, h_tuned, q, q_tuned)
        loss = None
        if labels is not None:
            acc = torch.promote_types(logits.dtype, torch.float32)  # half logits: CE in float32
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(acc), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return IMSMOutput(loss, logits)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, eos_token_id: int | Sequence[int] | None = None) -> torch.Tensor:
        """Greedy decoding with one KV cache for both streams (the doubled batch).

        input_ids [B, T] (left padding with `attention_mask` [B, T]; every attended token is
        prompt); q, q' are computed once from the prompt. `eos_token_id`: one stop id or several.
        Returns [B, T + n], n <= max_new_tokens (a row that produced a stop id continues with
        that id until every row has stopped).
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"fastcur.IMSM.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        stops = _stop_ids(eos_token_id)
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pm = self._prompt_mask(input_ids, attention_mask, None, None)
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
        out = input_ids
        if max_new_tokens == 0:
            return out
        was_training = self.training
        self.eval()  # no dropout anywhere while decoding
        try:
            h, h_tuned, cache = self.streams(input_ids, mask, position_ids, new_cache(self.model.config), use_cache=True)
            q, q_tuned = _masked_mean(h, pm), _masked_mean(h_tuned, pm)
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            stops = stops.to(input_ids.device)
            for step in range(max_new_tokens):
                logits = self.interweave(h[:, -1:], h_tuned[:, -1:], q, q_tuned)[:, -1]
                tok = logits.argmax(-1)
                if stops.numel():
                    tok = torch.where(done, out[:, -1], tok)
                    done |= torch.isin(tok, stops)
                out = torch.cat([out, tok[:, None]], dim=1)
                if step == max_new_tokens - 1 or (stops.numel() and bool(done.all())):
                    break
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                position_ids = position_ids[:, -1:] + 1
                h, h_tuned, cache = self.streams(tok[:, None], mask, position_ids, cache, use_cache=True)
        finally:
            self.train(was_training)
        return out

    # -- save / load ----------------------------------------------------------------------------
    def save_adapter(self, directory: str) -> None:
        """The adapters (`fastcur.save_adapter`'s files) and the gate (imsm_gate.safetensors:
        W_A, W_B; imsm_config.json), written into a fresh folder switched in with one rename
        (`fastcur._atomic.atomic_folder`): a crash leaves the old IMSM adapter or the new one."""
        from safetensors.torch import save_file

        from . import save_adapter
        from .adapter_files import ADAPTER_FILES
        config = {"gate_rank": self.gate_rank, "gate_dropout": self.gate_dropout,
                  "gate_dropout_at": self.gate_dropout_at, "hidden_size": self.hidden_size}
        with atomic_folder(directory, replaces=ADAPTER_FILES) as staging:
            save_adapter(self.model, staging)
            save_file({"W_A": self.W_A.detach().contiguous().cpu(), "W_B": self.W_B.detach().contiguous().cpu()},
                      os.path.join(staging, GATE_WEIGHTS))
            _write_text(os.path.join(staging, GATE_CONFIG), json.dumps(config, indent=2))

    @classmethod
    def load_adapter(cls, model: nn.Module, directory: str) -> "IMSM":
        """Inject and load the adapters into the fresh base `model` (`fastcur.load_adapter`),
        then wrap it in an IMSM with the saved gate. Reproduces the saved IMSM's outputs."""
        from . import load_adapter
        for name in (GATE_WEIGHTS, GATE_CONFIG):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"fastcur.IMSM.load_adapter: {directory!r} has no {name} "
                                        f"(saved by IMSM.save_adapter?)")
        # the gate is read and checked before the model changes (a bad gate file leaves it as it was)
        config, tensors = _read_gate(directory, getattr(getattr(model, "config", None), "hidden_size", None))
        model = load_adapter(model, directory)
        imsm = cls(model, gate_rank=config["gate_rank"], gate_dropout=float(config["gate_dropout"]),
                   gate_dropout_at=config.get("gate_dropout_at", "hidden"))
        with torch.no_grad():
            for name in ("W_A", "W_B"):
                getattr(imsm, name).copy_(tensors[name])
        return imsm

    # -- checks ---------------------------------------------------------------------------------
    def _check_ids(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = (f"{input_ids.dtype} of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"fastcur.IMSM: input_ids must be an integer tensor [B, T], got {got}")
        if input_ids.shape[1] == 0:
            raise ValueError("fastcur.IMSM: input_ids must have at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"fastcur.IMSM: attention_mask must have input_ids' shape "
                                 f"{tuple(input_ids.shape)}, got {got}")
        return input_ids, attention_mask

    def _prompt_mask(self, input_ids, attention_mask, prompt_lengths, prompt_mask) -> torch.Tensor:
        """[B, T] bool: the prompt tokens the query means run over."""
        B, T = input_ids.shape
        if prompt_lengths is not None and prompt_mask is not None:
            raise ValueError("fastcur.IMSM: pass prompt_lengths or prompt_mask, not both")
        if prompt_lengths is not None:
            pl = torch.as_tensor(prompt_lengths, device=input_ids.device)
            if pl.shape != (B,) or pl.is_floating_point():
                raise ValueError(f"fastcur.IMSM: prompt_lengths must be {B} integers (one per row of "
                                 f"input_ids), got {tuple(pl.shape)} {pl.dtype}")
            if bool((pl < 1).any()) or bool((pl > T).any()):
                raise ValueError(f"fastcur.IMSM: prompt_lengths must be in [1, T = {T}] (the sequence "
                                 f"length), got {pl.tolist()}")
            pm = torch.arange(T, device=input_ids.device)[None, :] < pl[:, None]
        elif prompt_mask is not None:
            if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.shape != (B, T):
                got = tuple(prompt_mask.shape) if isinstance(prompt_mask, torch.Tensor) else type(prompt_mask).__name__
                raise ValueError(f"fastcur.IMSM: prompt_mask must have input_ids' shape {(B, T)}, got {got}")
            pm = prompt_mask.bool()
        else:
            pm = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None:
            pm = pm & attention_mask.bool()
        if bool((pm.sum(1) == 0).any()):
            raise ValueError("fastcur.IMSM: every row needs at least one attended prompt token "
                             "(check prompt_lengths / prompt_mask against attention_mask)")
        return pm


@functools.lru_cache(maxsize=None)
def _active_dropout(backbone: nn.Module) -> str | None:
    """The first module of the base model (adapters excluded: the frozen rows bypass them) whose
    dropout acts in its current mode, as 'name (p=...)', or None: nn.Dropout modules and the
    float `*dropout` attributes transformers' attention layers apply when training."""
    skip: set[int] = set()
    for name, m in backbone.named_modules():
        if id(m) in skip or isinstance(m, AdapterLinear):
            skip.update(id(c) for c in m.modules())
            continue
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name} (p={m.p})"
        for attr, value in vars(m).items():
            if attr.endswith("dropout") and isinstance(value, float) and value > 0:
                return f"{name}.{attr} = {value}"
    return None


def _stop_ids(eos_token_id) -> torch.Tensor:
    """generate()'s `eos_token_id` (None, an int or a sequence of ints) as a 1-D int64 tensor."""
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"fastcur.IMSM.generate: eos_token_id must be None, an int or a sequence of ints, "
                         f"got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long)


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h [B, T, d], mask [B, T] bool -> [B, d]: the mean over the True positions."""
    w = mask.to(h.dtype)
    # where(), not h * 0: a padded position may hold NaN (a fully masked attention row).
    return torch.where(mask[..., None], h, 0).sum(1) / w.sum(1, keepdim=True)


def _read_gate(directory: str, d: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked gate config and tensors of an IMSM adapter folder (one-line errors naming
    the file); `d`: the model's hidden size, the shapes W_A [4d, gate_rank], W_B [gate_rank, d]."""
    from safetensors.torch import load_file

    from .adapter_files import load_json
    caller = "fastcur.IMSM.load_adapter"
    path = os.path.join(directory, GATE_CONFIG)
    config = load_json(path, caller)
    rank = config.get("gate_rank") if isinstance(config, dict) else None
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or \
            not isinstance(config.get("gate_dropout"), (int, float)):
        raise ValueError(f"{caller}: {path} needs an int gate_rank >= 1 and a number gate_dropout, got {config!r}")
    path = os.path.join(directory, GATE_WEIGHTS)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{caller}: {path} is not a readable safetensors file ({e})") from None
    d = d if d is not None else config.get("hidden_size")
    if not isinstance(d, int):
        raise ValueError(f"{caller}: the model's hidden size is unknown (no model.config.hidden_size) and "
                         f"{os.path.join(directory, GATE_CONFIG)} records none")
    for name, shape in (("W_A", (4 * d, rank)), ("W_B", (rank, d))):
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(f"{caller}: {path}: {name} must have shape {shape} (hidden size {d}, gate_rank "
                             f"{rank}), got {got}")
    return config, tensors


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
