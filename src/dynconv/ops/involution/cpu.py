"""``backend='cpu'`` for ``involution2d``: a loop over the ``K*K`` taps on strided views, no unfold buffer.

Why: ``F.unfold`` builds a ``K*K``-times larger patch tensor and autograd keeps it for
backward (49x the input at K=7). Each tap's input window here is a strided *view* of
the (padded) input, multiplied into an fp32 accumulator in place; backward does the
same in reverse, with an explicit formula instead of autograd, so nothing K*K-sized is
ever stored. The batch is processed in chunks small enough for the accumulator and the
input window to stay in cache across the taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..custom_op import compute_dtype, memory_format_of, new_output, skipped

Pair = tuple[int, int]

# Elements of one chunk's output accumulator: ~1 MiB of fp32 keeps a chunk L2-resident.
CHUNK_ELEMENTS = 1 << 18


def _chunk(n: int, per_example: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(1, per_example)))


def _padded_nchw(x: torch.Tensor, padding: Pair) -> torch.Tensor:
    """``x`` zero-padded, NCHW-contiguous whatever ``x``'s layout: the tap loop broadcasts each
    tap's kernel over a group's channels, which runs 2-4x slower on channels_last windows
    (their innermost dimension is the channel). One copy either way."""
    n, c, h, w = x.shape
    ph, pw = padding
    if not (ph or pw):
        return x.contiguous()
    if x.is_contiguous():
        return F.pad(x, (pw, pw, ph, ph))
    xp = x.new_zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp[:, :, ph : ph + h, pw : pw + w] = x
    return xp


def _window(t: torch.Tensor, a: int, b: int, ho: int, wo: int, s, d) -> torch.Tensor:
    """View of ``t`` (padded input) seen by tap ``(a, b)``: ``(N, C, H_out, W_out)``."""
    h0, w0 = a * d[0], b * d[1]
    return t[:, :, h0 : h0 + s[0] * (ho - 1) + 1 : s[0], w0 : w0 + s[1] * (wo - 1) + 1 : s[1]]


def forward(
    x: torch.Tensor, kernel: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, groups: int
) -> torch.Tensor:
    """Forward pass; geometry arguments are int pairs."""
    n, c, _, _ = x.shape
    kh, kw = kernel_size
    ho, wo = kernel.shape[3], kernel.shape[4]
    xp = _padded_nchw(x, padding)
    y = new_output((n, c, ho, wo), x, memory_format=torch.contiguous_format)
    step = _chunk(n, c * ho * wo)
    acc_dtype = compute_dtype(x.dtype)
    for n0 in range(0, n, step):
        xc, kc = xp[n0 : n0 + step], kernel[n0 : n0 + step]
        b = xc.shape[0]
        acc = torch.zeros((b, groups, c // groups, ho, wo), dtype=acc_dtype, device=x.device)
        for a in range(kh):
            for bb in range(kw):
                xs = _window(xc, a, bb, ho, wo, stride, dilation).unflatten(1, (groups, c // groups))
                acc.addcmul_(xs, kc[:, :, a * kw + bb].unsqueeze(2))
        y[n0 : n0 + step] = acc.view(b, c, ho, wo)
    return y.contiguous(memory_format=memory_format_of(x))


def backward(
    grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair,
    dilation: Pair, groups: int, need_input: bool = True, need_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(grad_x, grad_kernel)``; a skipped one is a fresh empty tensor."""
    n, c, h, w = x.shape
    kh, kw = kernel_size
    ph, pw = padding
    ho, wo = kernel.shape[3], kernel.shape[4]
    cg = c // groups
    grad = grad.to(x.dtype).contiguous()  # NCHW, as _padded_nchw says why
    xp = _padded_nchw(x, padding)
    acc_dtype = compute_dtype(x.dtype)
    grad_x, grad_k = skipped(x), skipped(x)
    gxp = torch.zeros(xp.shape, dtype=acc_dtype, device=x.device) if need_input else None
    if need_kernel:
        grad_k = new_output(kernel.shape, kernel, memory_format=torch.contiguous_format)
    step = _chunk(n, c * ho * wo)
    for n0 in range(0, n, step):
        dy = grad[n0 : n0 + step].unflatten(1, (groups, cg))
        if need_kernel and acc_dtype != x.dtype:
            dy32 = dy.to(acc_dtype)
        else:
            dy32 = dy
        for a in range(kh):
            for bb in range(kw):
                t = a * kw + bb
                if need_input:
                    gxs = _window(gxp[n0 : n0 + step], a, bb, ho, wo, stride, dilation).unflatten(1, (groups, cg))
                    gxs.addcmul_(dy, kernel[n0 : n0 + step, :, t].unsqueeze(2))
                if need_kernel:
                    xs = _window(xp[n0 : n0 + step], a, bb, ho, wo, stride, dilation).unflatten(1, (groups, cg))
                    grad_k[n0 : n0 + step, :, t] = torch.linalg.vecdot(dy32, xs.to(acc_dtype), dim=2)
    if need_input:
        grad_x = gxp[:, :, ph : ph + h, pw : pw + w].to(x.dtype)
        grad_x = grad_x.contiguous(memory_format=memory_format_of(x))
    return grad_x, grad_k
