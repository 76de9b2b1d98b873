"""Tiny models for the model-level API tests (built offline, seeded)."""
import torch
from torch import nn


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


def ids(seed: int = 1, shape=(3, 7), vocab: int = 29) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def tiny_llama(seed: int = 0):
    """A 2-layer LlamaForCausalLM with hidden 32 (transformers needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def perturb_adapters(model: nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """Give every trainable tensor random values, as training would (seeded)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
