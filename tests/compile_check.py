"""The op tests' torch.compile check: a fullgraph compile gives eager's loss and gradients."""
import torch


def assert_compiled_like_eager(step, args, wrt, *, same_loss: bool = False) -> None:
    """torch.compile(step, fullgraph=True, backend="aot_eager") gives eager's gradients of the
    scalar step(*args) with respect to the tensors `wrt` (and, with same_loss, eager's loss)."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    gc = torch.autograd.grad(loss_c, wrt)
    loss_e = step(*args)
    ge = torch.autograd.grad(loss_e, wrt)
    if same_loss:
        torch.testing.assert_close(loss_c, loss_e)
    for a, e in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, e)
