"""Tiny randomly initialised transformers causal LMs (built from configs, offline) and the
adapter settings the model-level tests inject into them.

Sizes keep every test fast: hidden 32, 2 layers, 4 heads (2 key/value heads), vocab 96.
Qwen2 has biases on q/k/v (so adapters over biased layers are exercised), Llama has none.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcur

ARCHS = ("llama", "qwen2")
METHODS = ("lora", "curlora", "secura", "jumplora")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 96


def tiny_causal_lm(arch: str, seed: int = 0, layers: int = 2, dtype=torch.float32) -> nn.Module:
    """A LlamaForCausalLM or Qwen2ForCausalLM with random weights (seeded), in eval mode."""
    import transformers

    cls_cfg, cls_model = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
    # initializer_range 0.2 (HF's default is 0.02): the CUR methods build their adapters from
    # W's own columns and rows, and the default's tiny weights make their updates vanishingly small.
    config = getattr(transformers, cls_cfg)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=False, use_cache=True)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_model)(config).to(dtype)
    return model.eval()


def method_config(method: str) -> fastcur.AdapterConfig:
    """The config the model-level tests inject: rank 4 on every attention and MLP projection.

    JumpLoRA runs at f = 0.5: at f = 1 with B = 0 at init no entry of Z passes the gate and the
    update gets no gradient (the method ramps f up from 0 over a task; SPEC §4). Its layers share
    one threshold (threshold_scope="global", the paper's)."""
    targets = list(PROJECTIONS)
    if method == "lora":
        return fastcur.LoRAConfig(rank=4, alpha=8.0, target_modules=targets)
    if method == "curlora":
        return fastcur.CURLoRAConfig(rank=4, target_modules=targets)
    if method == "secura":
        return fastcur.SecuraConfig(rank=4, target_modules=targets)
    if method == "jumplora":
        return fastcur.JumpLoRAConfig(rank=4, alpha=16.0, f=0.5, target_modules=targets)
    if method == "jumplora-rank":          # the rank-gated variant: a threshold of shape [r]
        return fastcur.JumpLoRAConfig(rank=4, alpha=16.0, gate="rank", target_modules=targets)
    raise ValueError(f"unknown method {method!r}")


def inject_method(model: nn.Module, method: str) -> nn.Module:
    """`fastcur.inject(model, method_config(method))`."""
    return fastcur.inject(model, method_config(method))


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: parameter} of the trainable parameters."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def batch(n: int = 2, t: int = 8, seed: int = 1) -> torch.Tensor:
    """[n, t] int64 token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: tiny tensors gain nothing from a second one,
    and on a loaded machine OpenMP's spinning workers made these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
