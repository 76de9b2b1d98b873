"""The continual-learning methods `fastcur continual` compares, registered by name.

A method is a small object the runner drives, task after task, with the same step budget:

    method = build_method("lora-ewc")
    method.setup(model, ctx)                 # inject adapters / freeze; cheap
    for i, task in enumerate(tasks):
        method.before_task(i, task)          # fresh adapters (IncLoRA), curvature fit (LaLoRA)
        opt = AdamW(method.parameters(), lr=method.lr)
        for step in range(steps):
            loss = method.loss(model, ctx.make_batch(method.mix_batch(examples, rng)))
            loss.backward(); opt.step(); opt.zero_grad(); method.after_step()
        method.after_task(i, task)           # EWC Fisher, replay buffer, IncLoRA fold
    method.state_dict() / method.load_state_dict(state)   # what --resume restores

Every adapter method adapts the same layers: every nn.Linear of the model except its output
embedding (the LM head), found by `linear_targets`.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .ewc import EWC
from .replay import ReplayBuffer
from .tasks import Example, Task

# Learning rates (AdamW, no weight decay; the runner adds a linear warm-up over the first tenth of
# each task's steps, cosine decay to 0 after it, and clips the gradient norm at 1, as CURLoRA's
# released runs and transformers' Trainer do). The papers' own values are for 1.5-8 B models and
# thousands of steps (CURLoRA: 2.5e-4) and none transfers to a 0.5 M-parameter model and 100
# steps. The rule instead (lr_grid.py): per parameterization family, the smallest rate of a small
# grid with at least 90 % of the grid's best mean validation accuracy over the tasks, each trained
# alone from the base with the quick mode's recipe; the values below come from `fastcur
# continual-lr-grid` (benchmarks/results/continual-lr-grid/). No method gets a search of its own
# that the others lack.
FAMILY_LR = {
    "seq": 1e-3,        # full fine-tuning (grid 1e-4 .. 3e-3: 98.4 %, the best)
    "lora": 3e-3,       # LoRA-style A/B adapters (lora, lora-er, lora-ewc, inclora, ella, jumplora-*, lalora-*,
                        # imsm-lora; grid 1e-3 .. 3e-2: 89.1 %, best 96.2 % at 1e-2)
    "curlora": 0.1,     # an r x r core U between fixed low-norm C, R (grid 3e-3 .. 1: 62.5 %, best 67.5 % at 0.3)
    "secura": 0.03,     # CABR: A/B between C and R, SigNorm on the output (secura, secura-released;
                        # grid 3e-3 .. 0.3: 60.6 %, best 62.8 % at 0.1)
}
RANK = 8
WARMUP_FRACTION = 0.1
CLIP_NORM = 1.0


@dataclass
class MethodContext:
    """What a method may use beyond the model.

    make_batch: list of Examples -> a training batch dict on the model's device
        (input_ids, attention_mask, labels [B, T]).
    pretraining: examples of the pretraining distribution (LaLoRA's source data).
    steps: optimizer steps per task; batch_size: examples per batch; seed: the run's seed.
    """
    make_batch: Callable[[list[Example]], dict]
    pretraining: list[Example] = field(default_factory=list)
    steps: int = 100
    batch_size: int = 16
    seed: int = 0
    fisher_batches: int = 4


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy on the answer tokens (labels -100 elsewhere)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def linear_targets(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear layers to adapt: all but the output embedding (LM head).
    Raises ValueError when there is none."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and m is not head]
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
        raise ValueError(f"the model ({type(model).__name__}) has no nn.Linear layer to adapt besides the LM head "
                         f"(layers with parameters: {', '.join(kinds) or 'none'}); fastcur adapters wrap "
                         f"torch.nn.Linear (e.g. GPT-2's Conv1D is not supported)")
    return names


def _batches(examples: list[Example], ctx: MethodContext, limit: int):
    for start in range(0, min(len(examples), limit * ctx.batch_size), ctx.batch_size):
        yield ctx.make_batch(examples[start:start + ctx.batch_size])


class Method:
    """Base: train whatever requires grad with the plain LM loss. Subclasses override hooks.
    `lr` is the family's rate (FAMILY_LR) unless set on the instance (the grid does)."""
    name = "base"
    family = "lora"
    _lr: float | None = None

    @property
    def lr(self) -> float:
        return FAMILY_LR[self.family] if self._lr is None else self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = float(value)

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        self.model, self.ctx = model, ctx

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def evaluation_model(self) -> nn.Module:
        """What is evaluated (and called by `loss`): the model, or a wrapper around it (IMSM)."""
        return self.model

    def before_task(self, index: int, task: Task) -> None:
        pass

    def mix_batch(self, examples: list[Example], rng: random.Random) -> list[Example]:
        return examples

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(model, batch)

    def after_step(self) -> None:
        pass

    def after_task(self, index: int, task: Task) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_REGISTRY: dict[str, Callable[[], Method]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def available_methods() -> list[str]:
    """Registered method names, in the order of the comparison."""
    return list(_REGISTRY)


def parse_methods(spec: str | list[str] | None) -> list[str]:
    """'seq,lora' (or a list; None or 'all': every method) -> validated names, order kept.
    Raises ValueError listing the valid names when one is unknown."""
    if spec is None or spec == "all" or spec == ["all"]:
        return available_methods()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"valid methods: {', '.join(available_methods())} (or 'all')")
    return list(dict.fromkeys(names))


def family_of(name: str) -> str:
    """The learning-rate family of a registered method (a key of FAMILY_LR)."""
    if name not in _REGISTRY:
        parse_methods([name])
    return _REGISTRY[name].family


def build_method(name: str) -> Method:
    if name not in _REGISTRY:
        parse_methods([name])
    return _REGISTRY[name]()


# -- the methods ---------------------------------------------------------------------------------
@register("seq")
class Sequential(Method):
    """SEQ: full fine-tuning of every parameter, task after task."""
    family = "seq"

    def setup(self, model, ctx):
        super().setup(model, ctx)
        model.requires_grad_(True)


def _inject(model: nn.Module, config) -> None:
    import fastcur

    fastcur.inject(model, config)


@register("lora")
class LoRA(Method):
    """One LoRA adapter (r = 8, alpha = 16) on every linear layer, trained through all tasks."""

    def setup(self, model, ctx):
        import fastcur

        super().setup(model, ctx)
        _inject(model, fastcur.LoRAConfig(rank=RANK, alpha=2.0 * RANK, target_modules=linear_targets(model)))


@register("lora-er")
class LoRAReplay(LoRA):
    """LoRA + experience replay: 64 training examples kept per finished task; a quarter of every
    batch is drawn from them."""

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.buffer = ReplayBuffer(per_task=64, ratio=0.25, seed=ctx.seed)

    def mix_batch(self, examples, rng):
        return self.buffer.mix(examples, rng)

    def after_task(self, index, task):
        self.buffer.add_task(index, task.train)

    def state_dict(self):
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        self.buffer.load_state_dict(state["buffer"])


@register("lora-ewc")
class LoRAEWC(LoRA):
    """LoRA + online EWC on the adapter tensors (diagonal Fisher on each finished task)."""
    ewc_lambda = 100.0

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.ewc = EWC(model, lam=self.ewc_lambda)

    def loss(self, model, batch):
        return lm_loss(model, batch) + self.ewc.penalty()

    def after_task(self, index, task):
        self.ewc.consolidate(list(_batches(task.train, self.ctx, self.ctx.fisher_batches)), lm_loss)

    def state_dict(self):
        return {"ewc": self.ewc.state_dict()}

    def load_state_dict(self, state):
        self.ewc.load_state_dict(state["ewc"])


@register("curlora")
class CURLoRA(Method):
    """CUR-LoRA (r = 8, inverted-norm sampling): only the r x r core U trains."""
    family = "curlora"

    def setup(self, model, ctx):
        import fastcur

        super().setup(model, ctx)
        _inject(model, fastcur.CURLoRAConfig(rank=RANK, seed=ctx.seed, target_modules=linear_targets(model)))


@register("secura")
class Secura(Method):
    """SECURA (CABR-LoRA r = 8, a = 32, SigNorm on the output)."""
    family = "secura"

    def setup(self, model, ctx):
        import fastcur

        super().setup(model, ctx)
        _inject(model, fastcur.SecuraConfig(rank=RANK, target_modules=linear_targets(model)))


@register("secura-released")
class SecuraReleased(Secura):
    """SECURA as its released code trains: the raw SigNorm (N = k L, not normalized), max over the
    whole tensor, a trainable output bias, and a plain merge of ΔW into W after every optimizer
    step (C and R kept: the code never re-selects them)."""

    def setup(self, model, ctx):
        import fastcur

        Method.setup(self, model, ctx)
        _inject(model, fastcur.SecuraConfig(rank=RANK, norm="raw", scope="tensor", lora_bias=True, merge_every=1,
                                            merge_mode="plain", reselect_on_merge=False,
                                            target_modules=linear_targets(model)))
        self.schedule = fastcur.MergeSchedule(model, None)

    def after_step(self):
        self.schedule.step()

    def state_dict(self):
        return {"steps": self.schedule.steps, "merges": self.schedule.merges}

    def load_state_dict(self, state):
        self.schedule.steps, self.schedule.merges = int(state["steps"]), int(state["merges"])


class _IncLoRAMethod(Method):
    """A fresh adapter per task through `fastcur.IncLoRA` (r = 8, alpha = 32, as JumpLoRA's
    released code), its update folded into W at the task's end; `jump` and `ella_lambda` pick
    the variant."""
    jump = True
    ella_lambda = 0.0

    def setup(self, model, ctx):
        import fastcur

        super().setup(model, ctx)
        model.requires_grad_(False)   # only each task's fresh adapters train
        self.manager = fastcur.IncLoRA(model, target_modules=linear_targets(model), rank=RANK,
                                       ella_lambda=self.ella_lambda, jump=self.jump)
        self._params: list[nn.Parameter] = []

    def before_task(self, index, task):
        self._params = self.manager.start_task(total_steps=self.ctx.steps)

    def parameters(self):
        return self._params

    def loss(self, model, batch):
        return lm_loss(model, batch) + self.manager.penalty()

    def after_step(self):
        self.manager.step()

    def after_task(self, index, task):
        self.manager.end_task()

    def state_dict(self):
        return {"inclora": self.manager.state_dict()}

    def load_state_dict(self, state):
        self.manager.load_state_dict(state["inclora"])


@register("inclora")
class IncLoRABaseline(_IncLoRAMethod):
    """IncLoRA: a fresh dense LoRA adapter per task, s B A folded into W at its end (the
    baseline JumpLoRA's paper improves)."""
    jump = False


@register("ella")
class ELLABaseline(_IncLoRAMethod):
    """ELLA: IncLoRA whose new ΔW is penalized where past tasks' updates are large (λ = 3e4,
    the released default), dense LoRA adapters."""
    jump = False
    ella_lambda = 3e4


@register("jumplora-inclora")
class JumpLoRAIncLoRA(_IncLoRAMethod):
    """JumpLoRA + IncLoRA: fresh weight-gated JumpLoRA adapters (one global θ) per task, the f
    schedule over the task's steps, the sparse ΔW folded into W at its end."""


@register("jumplora-ella")
class JumpLoRAELLA(_IncLoRAMethod):
    """JumpLoRA + IncLoRA + ELLA: penalizes the new task's ΔW where past tasks' updates are large
    (λ = 3e4, the released default)."""
    ella_lambda = 3e4


class _LaLoRA(LoRA):
    """LoRA + a Laplace penalty (LaLoRA): curvature of the pretraining loss (the source task) with
    respect to the adapter tensors, fitted once before the first task at the adapters' init θ0,
    then (λ/2) Σ (θ - θ0)^T Λ (θ - θ0) added to every task's loss. At θ0, B = 0: B's curvature
    is the meaningful part (A gets only the prior δ, its Fisher is exactly 0 there); a fit after
    a task would move the anchor away from the base model, whose knowledge is what is kept."""
    kind = "diag"
    lalora_lambda = 1e3

    def setup(self, model, ctx):
        import fastcur

        super().setup(model, ctx)
        self.reg = fastcur.LaplaceRegularizer(model, kind=self.kind, lam=self.lalora_lambda)

    def before_task(self, index, task):
        if not self.reg.fitted:
            if not self.ctx.pretraining:
                raise ValueError(f"{self.name}: no pretraining examples to fit the Laplace curvature on")
            self.reg.fit(list(_batches(self.ctx.pretraining, self.ctx, self.ctx.fisher_batches)), lm_loss,
                         progress=False)

    def loss(self, model, batch):
        return lm_loss(model, batch) + self.reg.penalty()

    def state_dict(self):
        return {"lalora": self.reg.state_dict()} if self.reg.fitted else {}

    def load_state_dict(self, state):
        if "lalora" in state:
            self.reg.load_state_dict(state["lalora"])


# LaLoRA's λ is its learning / forgetting dial: the benchmark runs a sweep (the trade-off curve).
LALORA_LAMBDAS = (1e2, 1e3, 1e4)


def _lalora(kind: str, lam: float):
    tag = f"{lam:.0e}".replace("e+0", "e")
    cls = type(f"LaLoRA_{kind}_{tag}", (_LaLoRA,), {"kind": kind, "lalora_lambda": lam,
                                                    "__doc__": f"LaLoRA ({kind} curvature), λ = {lam:g}."})
    return register(f"lalora-{kind}-{tag}")(cls)


for _lam in LALORA_LAMBDAS:
    _lalora("diag", _lam)
_lalora("kfac", 1e3)


class _IMSMForEvaluation(nn.Module):
    """What the benchmark evaluates for IMSM. With `prompt_lengths` (task and probe questions,
    generation) it is IMSM's own forward: the query means run over the prompt tokens. Without
    them (perplexity of plain text) the query of position t is the mean over positions <= t,
    so no token's prediction sees the tokens after it (a mean over the whole text would)."""
    kv_cache_generate = True    # generate() below: evaluate.greedy_generate decodes with IMSM's KV cache

    def __init__(self, imsm):
        super().__init__()
        self.imsm = imsm

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, eos_token_id=None):
        """IMSM's greedy decoding with a KV cache (left padding; the query over the prompt, as
        forward with `prompt_lengths`): evaluate.greedy_generate uses it."""
        return self.imsm.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)

    def forward(self, input_ids, attention_mask=None, prompt_lengths=None):
        from ..imsm import IMSMOutput

        if prompt_lengths is not None:
            return self.imsm(input_ids, attention_mask, prompt_lengths=prompt_lengths)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h, h_tuned, _ = self.imsm.streams(input_ids, attention_mask)
        B, T, d = h.shape
        w = attention_mask.to(h.dtype)[..., None]
        count = w.cumsum(1).clamp_min(1)
        q = (torch.where(w > 0, h, 0).cumsum(1) / count).reshape(B * T, d)
        q_tuned = (torch.where(w > 0, h_tuned, 0).cumsum(1) / count).reshape(B * T, d)
        logits = self.imsm.interweave(h.reshape(B * T, 1, d), h_tuned.reshape(B * T, 1, d), q, q_tuned)
        return IMSMOutput(None, logits.reshape(B, T, -1))


@register("imsm-lora")
class IMSMLoRA(LoRA):
    """IMSM over LoRA: the frozen and the LoRA-adapted model's final hidden states interwoven by
    a query-aware gate (gate rank 8, dropout 0.1) before the frozen LM head; the adapters and
    the gate train, the evaluated model is the IMSM wrapper (perplexity with a causal query)."""

    def setup(self, model, ctx):
        import fastcur

        super().setup(model, ctx)
        self.imsm = fastcur.IMSM(model, gate_rank=8, gate_dropout=0.1)
        self._evaluated = _IMSMForEvaluation(self.imsm)

    def parameters(self):
        return [p for p in self.imsm.parameters() if p.requires_grad]

    def evaluation_model(self):
        return self._evaluated

    def loss(self, model, batch):
        return self.imsm(batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_lengths"],
                         labels=batch["labels"]).loss

    def state_dict(self):
        return {"gate": {"W_A": self.imsm.W_A.detach().cpu().clone(), "W_B": self.imsm.W_B.detach().cpu().clone()}}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.imsm.W_A.copy_(state["gate"]["W_A"])
            self.imsm.W_B.copy_(state["gate"]["W_B"])
