"""fastcur: fused kernels for continual fine-tuning adapters (CURLoRA, SECURA, JumpLoRA, LaLoRA, IMSM)."""
from . import ops
from .backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["__version__", "ops", "get_backend", "set_backend", "use_backend"]
