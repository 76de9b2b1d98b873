"""Distributed training on the CPU: gloo, 2 processes on localhost, each test spawns once and
runs every method. DDP and FSDP2 (`fully_shard`) training of an injected tiny Llama give the
parameters (and the global losses) of single-process training on the same global batch, and
`save_adapter` from the wrapped model stores exactly the trained tensors.

FSDP2 shards every adapter layer as its own unit (inside per-block and root units): a fused
call that read a tensor owned by another module would then meet a sharded DTensor, or a
resharded one, and fail. JumpLoRA's shared threshold stays replicated through
`fastcur.replicate_thresholds`; without it fully_shard refuses the 0-dim θ (checked too).
"""
from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcur
from tiny_models import METHODS, batch, inject_method, one_thread, tiny_causal_lm, trainable  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
# the rank-gated JumpLoRA too: its threshold [r] could be sharded, but is shared across units
DIST_METHODS = METHODS + ("jumplora-rank",)
STEPS = 3
LR = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario: str, tmp) -> None:
    # fork, as DataLoader workers do: the children start with torch and transformers imported
    # (spawn spends ~10 s per child on imports here); each child runs one intra-op thread.
    mp.start_processes(_worker, args=(scenario, _free_port(), str(tmp)), nprocs=WORLD, join=True,
                       start_method="fork")


def _worker(rank: int, scenario: str, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        {"ddp": _ddp, "fsdp2": _fsdp2}[scenario](rank, tmp)
    finally:
        dist.destroy_process_group()


def _model(method: str):
    # float64: the only difference left between the runs is the order of the gradient sums
    return inject_method(tiny_causal_lm("llama", dtype=torch.float64), method).train()


def _single_process(method: str, ids: torch.Tensor):
    """(losses [STEPS], {name: initial parameter}, {name: final parameter}) of SGD on the whole
    global batch in this process."""
    model = _model(method)
    params = trainable(model)
    init = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), init, {n: p.detach() for n, p in params.items()}


def _train_shard(model, params, rank: int, ids: torch.Tensor) -> torch.Tensor:
    """SGD on this rank's half of `ids`; returns the global losses (mean of the ranks')."""
    local = ids.chunk(WORLD)[rank]
    opt = torch.optim.SGD(params, lr=LR, foreach=False)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss / WORLD)
    return torch.stack(losses)


def _compare(method, mode, losses, got, want_losses, init, want):
    # Equal token counts per rank: the mean of the ranks' mean losses is the global mean loss,
    # and the averaged gradient is the single-process gradient. The models run in float64 but
    # transformers' RMSNorm and rotary embeddings round to float32, so the runs differ by float32
    # roundings: each parameter's update must match to 1e-4 of its size (a missing or doubled
    # gradient average is off by 50-100 %).
    torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=0,
                               msg=lambda m: f"{mode} {method} losses: {m}")
    assert want_losses[-1] < want_losses[0], (method, want_losses)
    assert got.keys() == want.keys()
    for name in want:
        moved = (want[name] - init[name]).abs().max().item()
        err = (got[name] - want[name]).abs().max().item()
        assert err <= 1e-4 * moved + 1e-15, f"{mode} {method} {name}: error {err:.3g}, update {moved:.3g}"
    assert any((want[n] - init[n]).abs().max() > 0 for n in want)
    for name in want:      # the shared threshold learns too, so its gradient sync is checked
        if "log_theta" in name:
            assert (want[name] - init[name]).abs().max() > 0, name


def _save_and_reload(model, method, rank, tmp, got) -> None:
    """The saved adapter (each rank its own directory) rebuilds the trained tensors exactly."""
    directory = os.path.join(tmp, f"{method}-rank{rank}")
    fastcur.save_adapter(model, directory)
    loaded = fastcur.load_adapter(tiny_causal_lm("llama", dtype=torch.float64), directory)
    reloaded = {n: p.detach() for n, p in trainable(loaded).items()}
    assert reloaded.keys() == got.keys()
    for name in got:
        torch.testing.assert_close(reloaded[name], got[name], rtol=0, atol=0, msg=name)


def _ddp(rank: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = batch(2 * WORLD, 8)
    for method in DIST_METHODS:
        model = _model(method)
        params = trainable(model)
        ddp = DDP(model)
        losses = _train_shard(ddp, list(params.values()), rank, ids)
        got = {n: p.detach() for n, p in params.items()}
        _compare(method, "DDP", losses, got, *_single_process(method, ids))
        _save_and_reload(ddp, method, rank, tmp, got)


def _fsdp2(rank: int, tmp: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # views from reshape: no in-place use
    ids = batch(2 * WORLD, 8)
    for method in DIST_METHODS:
        model = _model(method)
        names = list(trainable(model))
        if method == "jumplora":
            # Why the thresholds must stay out of FSDP: fully_shard refuses the scalar θ.
            with pytest.raises(ValueError, match="scalar parameters"):
                fully_shard(_model(method))
        ignored = fastcur.replicate_thresholds(model)
        assert len(ignored) == (1 if method.startswith("jumplora") else 0)
        for layer in [m for m in model.modules() if isinstance(m, fastcur.AdapterLinear)]:
            fully_shard(layer, ignored_params=ignored)
        for block in model.model.layers:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        params = dict(model.named_parameters())
        sharded = [n for n in names if isinstance(params[n], DTensor)]
        assert len(sharded) == len(names) - len(ignored)
        losses = _train_shard(model, [params[n] for n in names], rank, ids)
        got = {n: (params[n].full_tensor() if isinstance(params[n], DTensor) else params[n]).detach()
               for n in names}
        want_losses, init, want = _single_process(method, ids)
        _compare(method, "FSDP2", losses, got, want_losses, init, want)
        # save_adapter gathers the sharded tensors: a collective, every rank saves
        _save_and_reload(model, method, rank, tmp, got)


def test_ddp_matches_single_process(tmp_path):
    _spawn("ddp", tmp_path)


def test_fsdp2_matches_single_process(tmp_path):
    _spawn("fsdp2", tmp_path)


def test_replicate_thresholds_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcur.replicate_thresholds(inject_method(tiny_causal_lm("llama"), "jumplora"))
