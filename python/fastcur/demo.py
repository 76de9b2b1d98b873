"""`fastcur demo`: fine-tune a small pretrained MLP whose nn.Linear layers became CURLoRALinear.

Stage 1 trains a small MLP fully on a synthetic regression task A (the "pretrained" model).
Stage 2 swaps every nn.Linear for `fastcur.CURLoRALinear.from_linear` (frozen W, trainable
r x r core U) and fine-tunes on task B (a teacher whose weights moved away from A's),
printing the loss, the trainable-parameter count against the full model, and the time per
step. Targets are standardized, so a loss of 1 is "predicts the mean". (The continual-learning benchmark
replaces this demo later.)
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .info import format_info
from .modules import CURLoRALinear


def _mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


def _task(teacher: nn.Module, n: int, width: int, gen: torch.Generator):
    x = torch.randn(n, width, generator=gen)
    with torch.no_grad():
        y = teacher(x)
    return x, (y - y.mean(0)) / y.std(0)


def swap_linears(model: nn.Module, **options) -> nn.Module:
    """Replace every nn.Linear child of `model` (recursively) by CURLoRALinear.from_linear."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, CURLoRALinear.from_linear(child, **options))
        else:
            swap_linears(child, **options)
    return model


def _train(model, x, y, steps, lr, desc, device):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, times = [], []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, x.shape[0], (256,))
        xb, yb = x[idx].to(device), y[idx].to(device)
        start = time.perf_counter()
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses, times


def check_options(steps, device, seed) -> None:
    """ValueError naming the option when one is unusable."""
    from .continual.runner import check_device

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be a positive int, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an int >= 0, got {seed!r}")
    check_device(device)


def run_demo(steps: int = 200, device: str = "cpu", seed: int = 0, width: int = 256, depth: int = 3,
             rank: int = 32) -> dict:
    check_options(steps, device, seed)
    print(format_info())
    print()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    teacher_a, teacher_b = _mlp(width, depth), _mlp(width, depth)
    with torch.no_grad():  # task B = task A plus a perturbation of the teacher's weights
        for pa, pb in zip(teacher_a.parameters(), teacher_b.parameters()):
            pb.copy_(pa + 0.5 * pb)
    xa, ya = _task(teacher_a, 4096, width, gen)
    xb, yb = _task(teacher_b, 4096, width, gen)

    model = _mlp(width, depth).to(device)
    print(f"stage 1: pretraining a {depth + 1}-layer MLP (width {width}) on task A")
    pre, _ = _train(model, xa, ya, 2 * steps, 2e-3, "pretrain", device)
    print(f"  task A loss {pre[0]:.4f} -> {pre[-1]:.4f}")
    full = sum(p.numel() for p in model.parameters())

    swap_linears(model, rank=rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"stage 2: nn.Linear -> fastcur.CURLoRALinear (rank {rank}); fine-tuning on task B")
    print(f"  trainable parameters: {trainable:,} of {full:,} ({100 * trainable / full:.2f} %)")
    losses, times = _train(model, xb, yb, steps, 1e-2, "CURLoRA", device)
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    print("  step   loss")
    for s in marks:
        print(f"  {s:>4}   {losses[s]:.5f}")
    per_step = sorted(times)[len(times) // 2]
    print(f"  loss {losses[0]:.5f} -> {losses[-1]:.5f} ({losses[-1] / losses[0]:.2f}x); "
          f"median time per step {1000 * per_step:.2f} ms (batch 256, {device})")
    return {"losses": losses, "trainable": trainable, "full": full, "time_per_step": per_step}
