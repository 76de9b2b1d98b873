"""Benchmarks of IMSM (docs/methods.md, IMSM) on a random Llama built offline, LoRA adapters on every projection.

    fastcur bench imsm [--quick] [--shapes B,T,d,L ...]            # a training step (fwd+bwd of the loss)
    fastcur bench imsm:generate [--quick] [--shapes B,T,d,L,N ...] # greedy generation of N tokens
    python benchmarks/bench_imsm.py [generate] [same arguments]

Shape: B sequences of T tokens (half prompt, half answer), hidden size d, L layers (heads of 64,
intermediate 8d/3, vocabulary 4096), gate rank 8, gate dropout 0.1 in training.
Providers:
  adapted model (plain)  the floor: the LoRA-adapted model alone, no IMSM (its loss / its greedy
                         decoding with a KV cache)
  IMSM (fastcur)         fastcur.IMSM: one weight copy, both streams in one batched pass
                         (frozen_batch_rows), the fused gate, one KV cache for both streams
  IMSM (train_streams=sequential)  training step only: the frozen stream under no_grad first,
                         then the tuned one, same weights (no autograd state for frozen rows)
  two-copy reference     what the paper's code does: a deep-copied frozen model (no grad) and the
                         adapted model run separately, the gate as nn.Linear(4d, 8) -> dropout ->
                         nn.Linear(8, d) on the concatenation [q ⊕ h ⊕ h' ⊕ q'], one KV cache each
The runner's peak memory is the peak *extra* bytes of one call; the weights each provider keeps
resident are in its note (`weights=... MiB`): IMSM and the plain model hold one copy, the two-copy
reference two. Tokens per second = B N / time.
"""
from __future__ import annotations

import copy
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks.providers import trainable_parameters
    from fastcur.benchmarks.runner import Benchmark, Case, Prepared, Skip, run_script
else:
    from .providers import trainable_parameters
    from .runner import Benchmark, Case, Prepared, Skip, run_script

FLOOR = "adapted model (plain)"
FOCUS = "IMSM (fastcur)"
TWO_COPY = "two-copy reference"
SEQUENTIAL = "IMSM (train_streams=sequential)"
VOCAB = 4096
GATE_RANK = 8
GATE_DROPOUT = 0.1
LORA_RANK = 8
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _adapted_llama(case: Case):
    """A random Llama with LoRA (rank 8, nonzero B as after training) on every projection."""
    try:
        import transformers
    except ImportError as exc:
        raise Skip(f"transformers is not installed ({exc})") from exc
    import fastcur

    d, L = case.shape["d"], case.shape["L"]
    torch.manual_seed(case.seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=(8 * d) // 3,
                                      num_hidden_layers=L, num_attention_heads=max(1, d // 64),
                                      num_key_value_heads=max(1, d // 64), max_position_embeddings=4096,
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(device=case.device, dtype=case.dtype)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for block, names in PROJ.items():
            parent = getattr(layer, block)
            for name in names:
                setattr(parent, name, fastcur.LoRALinear.from_linear(getattr(parent, name), rank=LORA_RANK,
                                                                     alpha=float(LORA_RANK)))
    g = torch.Generator().manual_seed(case.seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fastcur.LoRALinear):
                m.lora_B.weight.copy_(0.02 * torch.randn(m.lora_B.weight.shape, generator=g))
    return model


@functools.lru_cache(maxsize=4)
def _host_batch(B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    prompt = max(1, T // 2)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, torch.full((B,), prompt), labels


def _batch(case: Case):
    ids, pl, labels = _host_batch(case.shape["B"], case.shape["T"], case.seed)
    return ids.to(case.device), pl.to(case.device), labels.to(case.device)


def _mbytes(*modules: nn.Module) -> float:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / 2**20


class PaperGate(nn.Module):
    """The paper's gate as its code writes it: the concatenation is formed, then two Linears."""

    def __init__(self, d: int, device, dtype):
        super().__init__()
        self.down = nn.Linear(4 * d, GATE_RANK, bias=False, device=device, dtype=dtype)
        self.drop = nn.Dropout(GATE_DROPOUT)
        self.up = nn.Linear(GATE_RANK, d, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)

    def forward(self, h, h_tuned, q, q_tuned):
        T = h.shape[1]
        x = torch.cat([q[:, None].expand(-1, T, -1), h, h_tuned, q_tuned[:, None].expand(-1, T, -1)], dim=-1)
        g = torch.sigmoid(self.up(self.drop(self.down(x))))
        return g * h + (1 - g) * h_tuned


def _prompt_mean(h, prompt_lengths):
    w = (torch.arange(h.shape[1], device=h.device)[None, :] < prompt_lengths[:, None]).to(h.dtype)
    return torch.einsum("btd,bt->bd", h, w) / w.sum(1, keepdim=True)


# -- training step (mode fwd+bwd: forward returns the loss) -----------------------------------------
def plain_step(case: Case) -> Prepared:
    model = _adapted_llama(case).train()
    ids, _, labels = _batch(case)
    return Prepared(lambda: model(input_ids=ids, labels=labels).loss, leaves=trainable_parameters(model),
                    note=f"weights={_mbytes(model):.1f} MiB")


def imsm_step(case: Case) -> Prepared:
    import fastcur
    from fastcur.backend import resolve

    imsm = fastcur.IMSM(_adapted_llama(case), gate_rank=GATE_RANK, gate_dropout=GATE_DROPOUT,
                        train_streams="batched").train()   # the default is sequential on the CPU
    ids, pl, labels = _batch(case)
    return Prepared(lambda: imsm(ids, prompt_lengths=pl, labels=labels).loss, leaves=trainable_parameters(imsm),
                    note=f"weights={_mbytes(imsm):.1f} MiB, gate backend={resolve('imsm_gate', case.device)}")


def imsm_sequential_step(case: Case) -> Prepared:
    import fastcur

    imsm = fastcur.IMSM(_adapted_llama(case), gate_rank=GATE_RANK, gate_dropout=GATE_DROPOUT,
                        train_streams="sequential").train()
    ids, pl, labels = _batch(case)
    return Prepared(lambda: imsm(ids, prompt_lengths=pl, labels=labels).loss, leaves=trainable_parameters(imsm),
                    note=f"weights={_mbytes(imsm):.1f} MiB")


def two_copy_step(case: Case) -> Prepared:
    tuned = _adapted_llama(case).train()
    frozen = copy.deepcopy(tuned)
    for m in frozen.modules():
        if hasattr(m, "adapter_enabled"):
            m.adapter_enabled = False
    gate = PaperGate(case.shape["d"], case.device, case.dtype).train()
    ids, pl, labels = _batch(case)

    def forward():
        with torch.no_grad():
            h = frozen.model(input_ids=ids).last_hidden_state
        h_tuned = tuned.model(input_ids=ids).last_hidden_state
        logits = tuned.lm_head(gate(h, h_tuned, _prompt_mean(h, pl), _prompt_mean(h_tuned, pl)))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    return Prepared(forward, leaves=trainable_parameters(tuned, gate),
                    note=f"weights={_mbytes(tuned, frozen, gate):.1f} MiB")


# -- generation (mode infer: forward decodes N new tokens greedily) ----------------------------------
def _cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def plain_generate(case: Case) -> Prepared:
    model = _adapted_llama(case).eval()
    ids, _, _ = _batch(case)
    n = case.shape["N"]

    def forward():
        cache = _cache(model)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(n - 1):
            out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat([ids, *tokens], dim=1)

    return Prepared(forward, note=f"weights={_mbytes(model):.1f} MiB")


def imsm_generate(case: Case) -> Prepared:
    import fastcur

    imsm = fastcur.IMSM(_adapted_llama(case), gate_rank=GATE_RANK, gate_dropout=GATE_DROPOUT).eval()
    ids, _, _ = _batch(case)
    n = case.shape["N"]
    return Prepared(lambda: imsm.generate(ids, max_new_tokens=n), note=f"weights={_mbytes(imsm):.1f} MiB")


def two_copy_generate(case: Case) -> Prepared:
    tuned = _adapted_llama(case).eval()
    frozen = copy.deepcopy(tuned)
    for m in frozen.modules():
        if hasattr(m, "adapter_enabled"):
            m.adapter_enabled = False
    gate = PaperGate(case.shape["d"], case.device, case.dtype).eval()
    ids, _, _ = _batch(case)
    n = case.shape["N"]

    def forward():
        cf, ct = _cache(frozen), _cache(tuned)
        h = frozen.model(input_ids=ids, past_key_values=cf, use_cache=True).last_hidden_state
        ht = tuned.model(input_ids=ids, past_key_values=ct, use_cache=True).last_hidden_state
        q, qt = h.mean(1), ht.mean(1)
        tokens = []
        for step in range(n):
            tok = tuned.lm_head(gate(h[:, -1:], ht[:, -1:], q, qt))[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
            if step == n - 1:
                break
            h = frozen.model(input_ids=tok, past_key_values=cf, use_cache=True).last_hidden_state
            ht = tuned.model(input_ids=tok, past_key_values=ct, use_cache=True).last_hidden_state
        return torch.cat([ids, *tokens], dim=1)

    return Prepared(forward, note=f"weights={_mbytes(tuned, frozen, gate):.1f} MiB")


BENCHMARK = Benchmark(
    name="imsm",
    description="IMSM training step (loss fwd+bwd) on a random Llama with LoRA on every projection: "
                f"B sequences of T tokens, hidden d, L layers, vocab {VOCAB}, gate rank {GATE_RANK}",
    providers={FLOOR: plain_step, FOCUS: imsm_step, SEQUENTIAL: imsm_sequential_step, TWO_COPY: two_copy_step},
    floor=FLOOR,
    focus=FOCUS,
    baselines=(TWO_COPY,),
    shape_fields=("B", "T", "d", "L"),
    shapes=[(4, 128, d, L) for d, L in ((256, 4), (512, 4), (768, 6))],
    quick_shapes=[(4, 64, 256, 2)],
    dtypes=("float32",),
    quick_dtypes=("float32",),
    modes=("fwd+bwd",),
    details={"lora_rank": LORA_RANK, "gate_rank": GATE_RANK, "gate_dropout": GATE_DROPOUT, "vocab": VOCAB,
             "prompt": "first T // 2 tokens"},
)

GENERATE = Benchmark(
    name="imsm_generate",
    description="IMSM greedy generation of N tokens after a T-token prompt (KV cache), B sequences, "
                f"hidden d, L layers, vocab {VOCAB}",
    providers={FLOOR: plain_generate, FOCUS: imsm_generate, TWO_COPY: two_copy_generate},
    floor=FLOOR,
    focus=FOCUS,
    baselines=(TWO_COPY,),
    shape_fields=("B", "T", "d", "L", "N"),
    shapes=[(4, 64, d, L, 32) for d, L in ((256, 4), (512, 4), (768, 6))],
    quick_shapes=[(4, 32, 256, 2, 16)],
    dtypes=("float32",),
    quick_dtypes=("float32",),
    modes=("infer",),
    details={"lora_rank": LORA_RANK, "gate_rank": GATE_RANK, "vocab": VOCAB},
)

BENCHMARKS = {"generate": GENERATE}


if __name__ == "__main__":
    sys.exit(run_script("imsm", BENCHMARKS))
