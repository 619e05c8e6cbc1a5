"""Host-side helpers shared by the Triton launchers of the three ops (tile sizes, dot
precision, operand checks). Imports no triton: the launchers do, at their first call.

The device-dependent choices all go through :func:`for_gpu`, so that
``tools/aot_compile_launches.py`` can make them as on CUDA while running on the CPU.
"""

from __future__ import annotations

import torch

#: The dtypes the CondConv and involution kernels take.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def for_gpu(x: torch.Tensor) -> bool:
    """Whether launches for ``x`` are compiled for the GPU (else run by Triton's CPU
    interpreter): this decides tile configs, TF32 and the bf16 upcast below."""
    return x.is_cuda


def precision(x: torch.Tensor) -> str:
    """``tl.dot``'s ``input_precision``: TF32 for fp32 on the GPU when
    ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default for convolutions, so
    ``nn.Conv2d`` does the same), IEEE otherwise (the interpreter ignores it)."""
    if x.dtype == torch.float32 and for_gpu(x) and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def dot_upcast(x: torch.Tensor) -> bool:
    """Whether ``tl.dot`` operands go to fp32 first: only bf16 under the CPU interpreter,
    whose bf16 dot returns wrong results (triton 3.9); on the GPU bf16 feeds tensor cores."""
    return x.dtype == torch.bfloat16 and not for_gpu(x)


def next_pow2(v: int) -> int:
    """The smallest power of two ``>= v`` (1 for ``v <= 1``)."""
    return 1 << max(0, int(v) - 1).bit_length()


def block(extent: int, lo: int, hi: int) -> int:
    """A tile size for ``extent`` elements: its next power of two, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, next_pow2(extent)))


def tile_warps(block_p: int, block_c: int) -> int:
    """Warps for the element-wise (non-GEMM) kernels' ``block_p x block_c`` tiles: 64x64
    tiles spill registers at 4 warps on sm_90 (docs/performance.md); 8 hold them."""
    return 8 if block_p * block_c >= 4096 else 4


def check_operands(op: str, x: torch.Tensor, same_dtype: dict, same_device: dict) -> None:
    """``x`` in :data:`SUPPORTED_DTYPES`, the tensors of ``same_dtype`` in ``x``'s dtype and
    those of ``same_device`` on its device (``None`` entries skipped); errors name the
    argument."""
    where = f"{op} triton backend"
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    for name, t in same_dtype.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{where}: {name} dtype must match x ({x.dtype}), got {t.dtype}")
    for name, t in same_device.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{where}: {name} must be on {x.device}, got {t.device}")
