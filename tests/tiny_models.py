"""Tiny models for the model-level tests, built offline with seeded random weights, and the
adapter settings those tests inject into them.

- `tiny_lm`: a plain torch stack with HF-like names (`layers.0.q_proj`, `lm_head`), no
  transformers needed.
- `tiny_llama` / `byte_llama`: a LlamaForCausalLM, hidden 32, 4 heads (2 key/value heads);
  each test file keeps its own sizes through LlamaConfig fields.
- `tiny_causal_lm`: Llama or Qwen2 for the adapter-method tests (vocab 96). Qwen2 has biases on
  q/k/v (so adapters over biased layers are exercised), Llama has none.
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


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.up_proj, self.down_proj = nn.Linear(d, h), nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.v_proj(torch.tanh(self.q_proj(self.norm(x))))
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class TinyLM(nn.Module):
    """embed -> 2 blocks -> lm_head: names like `layers.0.q_proj`, an output head `lm_head`."""

    def __init__(self, vocab: int = 29, d: int = 24, h: int = 40, n: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, h) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def tiny_lm(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


def random_causal_lm(arch: str, seed: int = 0, dtype=torch.float32, **config) -> nn.Module:
    """A transformers LlamaForCausalLM or Qwen2ForCausalLM built from the config fields `config`,
    random weights (seeded), cast to `dtype`, in eval mode."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**config)).to(dtype).eval()


TINY_LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama(seed: int = 0, dtype=torch.float32, **config) -> nn.Module:
    """A random LlamaForCausalLM (seeded, eval mode): TINY_LLAMA's sizes, `config` over them."""
    return random_causal_lm("llama", seed, dtype, **{**TINY_LLAMA, **config})


def byte_llama(seed: int = 0, **config) -> nn.Module:
    """`tiny_llama` over fastcur.continual.ByteTokenizer's 259 tokens (pad 256, bos 257, eos 258)."""
    return tiny_llama(seed, **{"vocab_size": 259, "pad_token_id": 256, "bos_token_id": 257,
                               "eos_token_id": 258, **config})


def tiny_causal_lm(arch: str, seed: int = 0, layers: int = 2, dtype=torch.float32) -> nn.Module:
    """A LlamaForCausalLM or Qwen2ForCausalLM over VOCAB tokens with random weights (seeded), in
    eval mode."""
    # initializer_range 0.2 (HF's default is 0.02): the CUR methods build their adapters from
    # W's own columns and rows, and the default's tiny weights make their updates vanishingly small.
    return random_causal_lm(
        arch, seed, dtype, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=False, use_cache=True)


def ids(seed: int = 1, shape=(3, 7), vocab: int = 29) -> torch.Tensor:
    """Random int64 token ids of `shape` (seeded); vocab 29 is TinyLM's."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def batch(n: int = 2, t: int = 8, seed: int = 1) -> torch.Tensor:
    """[n, t] int64 token ids for `tiny_causal_lm`."""
    return ids(seed, (n, t), VOCAB)


@torch.no_grad()
def perturb_adapters(model: nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """Give every trainable tensor random values, as training would (seeded)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def method_config(method: str) -> fastcur.AdapterConfig:
    """The config the model-level tests inject: rank 4 on every attention and MLP projection.

    JumpLoRA runs at f = 0.5: at f = 1 with B = 0 at init no entry of Z passes the gate and the
    update gets no gradient (the method ramps f up from 0 over a task; docs/methods.md, JumpLoRA). Its layers share
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


def adamw_losses(model: nn.Module, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    """A plain AdamW loop over the trainable parameters of a causal LM on one batch `ids`
    [B, T] (labels = ids): the loss of every step."""
    opt = torch.optim.AdamW(trainable(model).values(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: tiny tensors gain nothing from a second one,
    and on a loaded machine OpenMP's spinning workers made these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
