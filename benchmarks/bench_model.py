"""Whole-model training step: a Llama-style decoder built from a config (no download), adapters on
q, k, v, o, gate, up and down of every block, one step (forward, backward, AdamW) per method.

    fastcur bench model [--size cpu|gpu] [--shapes B,T,d,L,r,V ...] [--reps N] ...
    python benchmarks/bench_model.py [same arguments]

Shape: B sequences of T tokens (random ids, loss on every token), hidden size d, L blocks (heads of
64, as many key/value heads, intermediate 8d/3), adapter rank r, vocabulary V. `--size cpu`
(default grid) fits two cores in a few minutes in float32; `--size gpu` is one GPU in bfloat16.
Every provider builds the same seeded model, gives its adapter nonzero values (as after some
training: B = 0 would make several methods degenerate), and is timed interleaved with the
others (the runner's round-robin), so the ratios are of paired runs.

Providers (mode "train": one call = zero_grad, forward, loss, backward, AdamW step):
  frozen model (floor)  no adapter; the embedding output requires grad, so the backward runs
                        through every block (the least a step of any adapter must do); no optimizer
  PEFT LoRA             peft.get_peft_model(LoraConfig(r, alpha 2r)) (its defaults: float32 adapters)
  fastcur LoRA          fastcur.inject(LoRAConfig(rank r, alpha 2r))
  CURLoRA               fastcur.inject(CURLoRAConfig(rank r))
  SECURA                fastcur.inject(SecuraConfig(rank r))
  JumpLoRA (weight)     fastcur.inject(JumpLoRAConfig(rank r, gate="weight", f=0.5)), θ reset
                        (fastcur.reset_thresholds) after the adapter gets its values: the state
                        of a scheduled run at f = 0.5 (the schedule resets θ at f_start, before
                        f leaves 0), about r (n + k) entries of each n x k Z kept by the gate
  JumpLoRA (rank)       fastcur.inject(JumpLoRAConfig(rank r, gate="rank"))
  LaLoRA                fastcur LoRA + LaplaceRegularizer(kind="diag") fitted once on one batch
                        before timing; the step adds its gradient with add_penalty_grad_ (fused)
  IMSM                  fastcur.IMSM around the fastcur LoRA model (both streams in one batched
                        pass, the fused gate); the first half of each sequence is the prompt
Tokens per second = B T / step time. Ratios: against the floor and against PEFT LoRA.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

if __package__ in (None, ""):          # run as a script: use the installed package's runner
    from fastcur.benchmarks.providers import PEFT_LORA, trainable_parameters
    from fastcur.benchmarks.runner import Benchmark, Case, Prepared, Skip, run_script
else:
    from .providers import PEFT_LORA, trainable_parameters
    from .runner import Benchmark, Case, Prepared, Skip, run_script

FLOOR = "frozen model (floor)"
FOCUS = "fastcur LoRA"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = 1e-4
ADAPTER_STD = 0.02          # the random values every trainable adapter tensor gets before timing
SIZES = {
    "cpu": {"shapes": [(2, 128, 256, 4, 8, 2048)], "dtypes": ("float32",), "device": "cpu"},
    "gpu": {"shapes": [(8, 1024, 2048, 8, 16, 32000)], "dtypes": ("bfloat16",), "device": "cuda"},
}


def llama(case: Case) -> nn.Module:
    """The seeded random LlamaForCausalLM of the case, frozen, in train mode, on its device/dtype."""
    try:
        import transformers
    except ImportError as exc:
        raise Skip(f"transformers is not installed ({exc})") from exc
    s = case.shape
    heads = max(1, s["d"] // 64)
    config = transformers.LlamaConfig(
        vocab_size=s["V"], hidden_size=s["d"], intermediate_size=(8 * s["d"]) // 3, num_hidden_layers=s["L"],
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(2048, s["T"]),
        tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(case.seed)
    with torch.device(case.device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(case.dtype).requires_grad_(False).train()


def token_ids(case: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.seed + 2)
    return torch.randint(0, case.shape["V"], (case.shape["B"], case.shape["T"]), generator=g).to(case.device)


@torch.no_grad()
def perturb(params: list, seed: int) -> None:
    """Nonzero values in every trainable tensor, as after some training (seeded)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) * ADAPTER_STD)


def training_step(model: nn.Module, ids: torch.Tensor, params: list, after_backward=None, loss_fn=None) -> Prepared:
    """The timed call: zero_grad, loss, backward, (after_backward), AdamW step over `params`."""
    opt = torch.optim.AdamW(params, lr=LR)
    loss_fn = loss_fn or (lambda: model(input_ids=ids, labels=ids).loss)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        return loss
    return Prepared(step, leaves=params, note=f"{sum(p.numel() for p in params):,} trainable")


def frozen(case: Case) -> Prepared:
    model, ids = llama(case), token_ids(case)
    # The embedding's output becomes a leaf that requires grad: the backward then runs through
    # every block down to it (an adapter step needs that much), and nothing is trained.
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss
    return Prepared(step, note="no adapter, no optimizer")


def peft_lora(case: Case) -> Prepared:
    import peft
    from peft import LoraConfig, get_peft_model

    r = case.shape["r"]
    model = get_peft_model(llama(case), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none",
                                                   target_modules=list(PROJECTIONS)))
    params = trainable_parameters(model)
    perturb(params, case.seed + 3)
    prepared = training_step(model, token_ids(case), params)
    prepared.note += f", peft {peft.__version__}"
    return prepared


def _injected(case: Case, config) -> nn.Module:
    import fastcur

    model = fastcur.inject(llama(case), config)
    perturb(trainable_parameters(model), case.seed + 3)
    return model


def fastcur_method(make_config) -> callable:
    """A provider: fastcur.inject(make_config(r, targets)) and the plain training step."""
    def provider(case: Case) -> Prepared:
        from fastcur.backend import resolve

        model = _injected(case, make_config(case.shape["r"], list(PROJECTIONS)))
        prepared = training_step(model, token_ids(case), trainable_parameters(model))
        prepared.note += f", backend {resolve('cur_linear', case.device)}"
        return prepared
    return provider


def _lora_config(r, targets):
    import fastcur

    return fastcur.LoRAConfig(rank=r, alpha=2.0 * r, target_modules=targets)


def lalora(case: Case) -> Prepared:
    import fastcur

    model, ids = _injected(case, _lora_config(case.shape["r"], list(PROJECTIONS))), token_ids(case)
    reg = fastcur.LaplaceRegularizer(model, kind="diag", lam=1.0)
    reg.fit([ids], lambda m, batch: m(input_ids=batch, labels=batch).loss, progress=False)
    prepared = training_step(model, ids, trainable_parameters(model), after_backward=reg.add_penalty_grad_)
    prepared.note += ", diag penalty via add_penalty_grad_"
    return prepared


def imsm(case: Case) -> Prepared:
    import fastcur

    wrapped = fastcur.IMSM(_injected(case, _lora_config(case.shape["r"], list(PROJECTIONS)))).train()
    ids = token_ids(case)
    prompt = max(1, ids.shape[1] // 2)
    prompt_lengths = torch.full((ids.shape[0],), prompt, device=ids.device)
    labels = ids.clone()
    labels[:, :prompt] = -100
    loss = lambda: wrapped(ids, prompt_lengths=prompt_lengths, labels=labels).loss  # noqa: E731
    prepared = training_step(wrapped, ids, trainable_parameters(wrapped), loss_fn=loss)
    prepared.note += f", train_streams={wrapped.train_streams}"
    return prepared


def jumplora_weight(case: Case) -> Prepared:
    """JumpLoRA (weight gate) as a scheduled training run has it at f = 0.5: the released schedule
    (docs/methods.md, JumpLoRA) resets θ to the order statistic of |Z| that keeps about as many
    entries as LoRA has parameters at `int(f_start T)` steps, while f is still 0, and only then
    ramps f up. So at f = 0.5 the gate's mask is that sparse post-reset one: after the adapter
    gets its (trained-like) values, `fastcur.reset_thresholds` sets θ exactly as the schedule's
    reset does (same function, the config's global scope). Without it θ would stay at its init
    exp(-4.7), a state no training run has once f > 0."""
    import fastcur
    from fastcur.backend import resolve

    model = _injected(case, _config("JumpLoRAConfig", gate="weight", f=0.5)(case.shape["r"], list(PROJECTIONS)))
    theta = fastcur.reset_thresholds(model)
    prepared = training_step(model, token_ids(case), trainable_parameters(model))
    prepared.note += (f", backend {resolve('jump_linear', case.device)}, θ reset to "
                      f"{', '.join(f'{t:.3g}' for t in theta.values())} (f = 0.5)")
    return prepared


def _config(cls_name: str, **kw):
    def make(r, targets):
        import fastcur

        return getattr(fastcur, cls_name)(rank=r, target_modules=targets, **kw)
    return make


BENCHMARK = Benchmark(
    name="model",
    description="one training step (forward, backward, AdamW) of a Llama-style decoder, adapters on "
                "q, k, v, o, gate, up, down; floor: the frozen model's backward through every block",
    providers={
        FLOOR: frozen,
        PEFT_LORA: peft_lora,
        FOCUS: fastcur_method(_lora_config),
        "CURLoRA": fastcur_method(_config("CURLoRAConfig")),
        "SECURA": fastcur_method(_config("SecuraConfig")),
        "JumpLoRA (weight)": jumplora_weight,
        "JumpLoRA (rank)": fastcur_method(_config("JumpLoRAConfig", gate="rank")),
        "LaLoRA": lalora,
        "IMSM": imsm,
    },
    floor=FLOOR,
    focus=FOCUS,
    baselines=(PEFT_LORA,),
    shape_fields=("B", "T", "d", "L", "r", "V"),
    shapes=SIZES["cpu"]["shapes"],
    quick_shapes=[(2, 64, 128, 2, 8, 512)],
    dtypes=("float32",),
    quick_dtypes=("float32",),
    modes=("train",),
    throughput=("tokens", lambda case: case.shape["B"] * case.shape["T"]),
    sizes=SIZES,
    details={"targets_cpu_vs_peft_lora": {"fastcur LoRA": 1.0, "CURLoRA": 1.0, "SECURA": 1.0,
                                          "JumpLoRA (weight)": 1.0, "JumpLoRA (rank)": 1.0,
                                          "LaLoRA": 1.05, "IMSM": 2.05},
             "optimizer": f"torch.optim.AdamW(lr={LR}), default implementation per device"},
)


if __name__ == "__main__":
    sys.exit(run_script("model"))
