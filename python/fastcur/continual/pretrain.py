"""The benchmark's base model: a tiny Llama pretrained in-process on the synthetic world, cached.

`pretrained_base(cache_dir)` builds the world, trains a `transformers.LlamaForCausalLM` from a
config (no download) with AdamW on the world's pretraining texts, measures its probe accuracy and
held-out perplexity, and saves model + `pretrain.json` under
`cache_dir/<size>-seed<seed>-steps<steps>-<hash of every weight-changing setting>/` atomically (written to
a temporary folder beside it, then renamed). Later calls with the same key load it from there.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .evaluate import accuracy, perplexity
from .tokenizer import ByteTokenizer
from .world import WORLD_VERSION, build_world

# size -> model shape, default pretraining steps, batch (rows of packed texts), peak learning rate,
# world size. "tiny" is for tests and smoke runs only (it learns little).
SIZES = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "steps": 50, "batch_size": 8, "lr": 5e-3, "n_entities": 8},
    "quick": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 384,
              "steps": 2400, "batch_size": 16, "lr": 3e-3, "n_entities": 48},
    "full": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 768,
             "steps": 3000, "batch_size": 16, "lr": 2e-3, "n_entities": 96},
}
MAX_LEN = 256
SEQ_LEN = 128           # tokens per packed pretraining row
RECIPE = "adamw-wd0.01-b0.9,0.98-warmup5%-cosine-clip1"   # change when pretrain()'s recipe changes
PRETRAIN_FILE = "pretrain.json"


def _check_size(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fastcur/continual, or ~/.cache/fastcur/continual."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fastcur" / "continual"


def tiny_llama_config(vocab_size: int = ByteTokenizer.vocab_size, size: str = "quick", tokenizer=None):
    """A `transformers.LlamaConfig` of the given size ("tiny", "quick" or "full"; tied embeddings,
    max 256 positions)."""
    from transformers import LlamaConfig

    shape = _check_size(size)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    tok = tokenizer or ByteTokenizer()
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=MAX_LEN,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)


def _packed_batch(texts: list[str], order: list[int], tokenizer, rows: int, seq_len: int) -> dict:
    """`rows` rows of `seq_len` tokens, each holding whole texts ([bos] text [eos]) taken in `order`
    (consumed from the front) until the next does not fit; labels -100 on the padding only."""
    seqs: list[list[int]] = []
    row: list[int] = []
    while len(seqs) < rows:
        ids = tokenizer.encode(texts[order[0]], add_bos=True, add_eos=True)[:seq_len]
        if row and len(row) + len(ids) > seq_len:
            seqs.append(row)
            row = []
            continue
        row += ids
        order.pop(0)
    ids = torch.full((rows, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((rows, seq_len), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def pretrain(model, texts: list[str], tokenizer, steps: int, batch_size: int = 16, lr: float = 3e-3,
             seed: int = 0, seq_len: int = SEQ_LEN, progress: bool = True, desc: str = "pretrain") -> dict:
    """Train `model` (a causal LM taking input_ids/attention_mask/labels and returning .loss) for
    `steps` AdamW steps (weight decay 0.01, 5% linear warm-up, cosine decay, gradient norm clipped
    at 1) on batches of `batch_size` rows of `seq_len` tokens packed with whole texts, drawn in
    epochs of a fresh seeded shuffle. Returns {"losses": [per step], "seconds": wall time}."""
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not texts:
        raise ValueError("texts is empty")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    model.train()
    losses: list[float] = []
    order: list[int] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for _ in bar:
        while len(order) < batch_size * (seq_len // 2 + 1):  # texts have >= 2 tokens: enough for a batch
            order += torch.randperm(len(texts), generator=gen).tolist()
        batch = _packed_batch(texts, order, tokenizer, batch_size, seq_len)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start}


def base_world(seed: int = 0, size: str = "quick"):
    """The World that `pretrained_base(seed=seed, size=size)` pretrains on: use its probe() and
    heldout_texts() to measure that base model (the number of people depends on the size)."""
    return build_world(seed, n_entities=_check_size(size)["n_entities"])


def pretrain_settings(seed: int = 0, size: str = "quick", steps: int | None = None) -> dict:
    """Every setting that changes the pretrained weights: the model's shape, the recipe (steps,
    batch, learning rate, sequence length, schedule), the seed, the world's and the task
    generators' versions (the format primers come from the tasks), and the versions of fastcur,
    torch and transformers."""
    import transformers

    from .. import __version__
    from .tasks import GENERATOR_VERSION

    shape = dict(_check_size(size))
    steps = shape.pop("steps") if steps is None else steps
    shape.pop("steps", None)
    return {"size": size, "shape": shape, "steps": steps, "seed": seed, "seq_len": SEQ_LEN, "max_len": MAX_LEN,
            "recipe": RECIPE, "world": WORLD_VERSION, "generators": GENERATOR_VERSION, "fastcur": __version__,
            "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def cache_key(seed: int = 0, size: str = "quick", steps: int | None = None) -> str:
    """The folder name of a cached base model: readable parts, then a hash of every setting that
    changes the weights (`pretrain_settings`)."""
    import hashlib
    import json as _json

    settings = pretrain_settings(seed, size, steps)
    digest = hashlib.sha256(_json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{size}-seed{seed}-steps{settings['steps']}-{digest}"


def pretrained_base(cache_dir: str | os.PathLike | None = None, seed: int = 0, size: str = "quick",
                    steps: int | None = None, progress: bool = True, device: str | torch.device = "cpu"):
    """(model, tokenizer): the tiny Llama pretrained on `build_world(seed)`, from the cache when
    there, else trained now (a few minutes for "quick" on 2 CPU cores) and cached. The model is
    in eval mode on `device`; its pretraining facts (loss, time, probe accuracy, perplexity) are
    in `<cache folder>/pretrain.json` (see `pretrain_info`)."""
    from transformers import LlamaForCausalLM

    shape = _check_size(size)
    steps = shape["steps"] if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be None or an int >= 1, got {steps!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    cache_dir = Path(default_cache_dir() if cache_dir is None else cache_dir)
    final = cache_dir / cache_key(seed, size, steps)
    tokenizer = ByteTokenizer()
    if (final / PRETRAIN_FILE).is_file():
        model = LlamaForCausalLM.from_pretrained(final, local_files_only=True)
        return model.to(device).eval(), tokenizer

    torch.manual_seed(seed)
    world = base_world(seed, size)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer.vocab_size, size)).to(device)
    log = pretrain(model, world.pretraining_texts(), tokenizer, steps, batch_size=shape["batch_size"],
                   lr=shape["lr"], seed=seed, progress=progress)
    tail = log["losses"][-max(1, steps // 10):]
    info = {**pretrain_settings(seed, size, steps), "world_version": WORLD_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(log["seconds"], 2), "first_loss": log["losses"][0],
            "final_loss": sum(tail) / len(tail),
            "probe_accuracy": accuracy(model, world.probe(), tokenizer, batch_size=64),
            "probe_generation_accuracy": accuracy(model, world.probe(ranked=False), tokenizer, batch_size=64),
            "heldout_perplexity": perplexity(model, world.heldout_texts(), tokenizer, batch_size=64),
            "probe_chance": 1 / len(world.values("job"))}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        (tmp / PRETRAIN_FILE).write_text(json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it 0700; the cache is a plain folder
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / PRETRAIN_FILE).is_file():  # not a concurrent writer that got there first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), tokenizer


def pretrain_info(cache_dir: str | os.PathLike | None = None, seed: int = 0, size: str = "quick",
                  steps: int | None = None) -> dict | None:
    """The `pretrain.json` facts of a cached base model, or None when it is not cached."""
    cache_dir = Path(default_cache_dir() if cache_dir is None else cache_dir)
    path = cache_dir / cache_key(seed, size, steps) / PRETRAIN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
