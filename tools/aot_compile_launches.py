"""Compile every Triton launch that dynconv's kernel wrappers make on a GPU, for sm_90,
without a GPU: run by ``tests/ops/test_triton_aot.py`` in a subprocess (Triton reads
``TRITON_INTERPRET`` at import, and this must run the real compiler, not the interpreter).

How: ``JITFunction.run`` is replaced by a recorder; the wrappers' device-dependent choices
(tile configs, TF32, the interpreter's bf16 upcast: ``triton_utils.for_gpu``) are made as
on CUDA; the
switched-conv, CondConv and involution wrappers are called on small CPU tensors in the
configurations that pick different kernels and constexprs (dense, grouped, depthwise,
premixed kernels, stride 2, channels_last, fp32/bf16/fp16, partial gradients,
deterministic or not); each distinct launch is compiled with
``triton.compile(ASTSource(...), target=sm_90)``. The kernels never run, so outputs are
garbage; only the compile matters. Prints ``compiled N launches``. Usable with any
installed Triton (e.g. the GPU machine's 3.6 via ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.int64: "i64"}
_launches: dict[tuple, tuple[JITFunction, dict, dict, dict]] = {}


def _record(self: JITFunction, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = self.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    constexprs = {self.arg_names[i] for i in self.constexprs}
    signature, consts = {}, {}
    for name, value in bound.arguments.items():
        if name in constexprs:
            signature[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{self.__name__}: argument {name} of type {type(value).__name__} is not handled")
    key = (self.__name__, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in consts.items())), tuple(sorted(options.items())))
    _launches.setdefault(key, (self, signature, consts, options))


def _as_on_cuda() -> None:
    """The wrappers' choices as they are made for CUDA tensors (TF32 as PyTorch's default)."""
    from dynconv.ops import triton_utils

    triton_utils.for_gpu = lambda x: True
    torch.backends.cudnn.allow_tf32 = True


def _exercise_switched(gen: torch.Generator) -> None:
    from dynconv.ops.switched import triton_launch as sw

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for c, o, k, stride in ((8, 16, 3, 1), (16, 8, 1, 1), (4, 4, 7, 2), (8, 8, 2, 1)):
            ho = (9 + 2 * (k // 2) - k) // stride + 1
            x = torch.randn(2, c, 9, 9, generator=gen).to(dtype)
            w = torch.randn(4, o, c, k, k, generator=gen).to(dtype)
            b = torch.randn(o, generator=gen).to(dtype)
            index = torch.randint(0, 4, (2, ho, ho), generator=gen)
            gate = torch.rand(2, ho, ho, generator=gen).to(dtype)
            geometry = ((stride, stride), (k // 2, k // 2), (1, 1))
            for deterministic in (False, True):
                sw.forward(x, w, b, index, gate, *geometry, deterministic)
                g = torch.randn(2, o, ho, ho, generator=gen).to(dtype)
                for needs in ((True, True, True, True), (False, True, True, False), (True, False, False, True)):
                    sw.backward(g, x, w, b, index, gate, *geometry, deterministic, needs)


def _exercise() -> None:
    from dynconv.ops.condconv import triton_launch as cc
    from dynconv.ops.involution import triton_launch as inv

    gen = torch.Generator().manual_seed(0)
    _exercise_switched(gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            # (n, cin, cout, hw, k, groups, stride): dense (the benchmark's channel counts, with
            # their full-size tiles), grouped, depthwise with a multiplier
            for n, cin, cout, hw, k, groups, stride in (
                (2, 16, 32, 6, 3, 1, 1), (2, 128, 128, 16, 3, 1, 1), (2, 64, 64, 24, 3, 1, 1),
                (2, 16, 16, 24, 3, 2, 2), (2, 8, 16, 7, 5, 8, 1), (2, 8, 8, 6, 3, 8, 2), (2, 256, 256, 14, 3, 256, 1),
            ):
                x = torch.randn(n, cin, hw, hw, generator=gen).to(dtype).contiguous(memory_format=fmt)
                w = torch.randn(3, cout, cin // groups, k, k, generator=gen).to(dtype)
                b = torch.randn(3, cout, generator=gen).to(dtype)
                r = torch.rand(n, 3, generator=gen).to(dtype)
                geometry = ((stride, stride), (k // 2, k // 2), (1, 1), groups)
                for premix_min in (1, 10**9):  # premixed kernels on and off
                    cc.PREMIX_MIN_P_TILES = premix_min
                    y = cc.forward(x, w, b, r, *geometry)
                    g = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
                    for need_input, need_params in ((True, True), (True, False), (False, True)):
                        cc.backward(g, x, w, b, r, *geometry, need_input=need_input, need_params=need_params)
            # (c, K, groups, stride): the benchmark's channel groups (16 per group), one wide
            # group (tiles inside one group), groups narrower than a tile, stride 2
            for c, k, groups, stride in ((64, 7, 4, 1), (64, 3, 4, 1), (32, 7, 4, 2), (64, 5, 1, 1), (64, 7, 1, 1), (24, 3, 3, 1)):
                x = torch.randn(2, c, 9, 9, generator=gen).to(dtype).contiguous(memory_format=fmt)
                ho = (9 + 2 * (k // 2) - k) // stride + 1
                kern = torch.randn(2, groups, k * k, ho, ho, generator=gen).to(dtype)
                geometry = ((k, k), (stride, stride), (k // 2, k // 2), (1, 1), groups)
                y = inv.forward(x, kern, *geometry)
                g = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
                for need_input, need_kernel in ((True, True), (True, False), (False, True)):
                    inv.backward(g, x, kern, *geometry, need_input=need_input, need_kernel=need_kernel)


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """``(registers, stack bytes, local bytes)`` per thread of the kernel in ``cubin``, from
    ``cuobjdump --dump-resource-usage`` (bundled with Triton's NVIDIA backend); local memory
    is where registers spill to."""
    import triton.backends.nvidia

    cuobjdump = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return int(usage["REG"]), int(usage["STACK"]), int(usage["LOCAL"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="also print shared memory, registers and stack/spill bytes per launch")
    args = parser.parse_args()
    JITFunction.run = _record
    _as_on_cuda()
    _exercise()
    failures, rows = [], []
    for fn, signature, consts, options in _launches.values():
        opts = {"num_warps": 4, "num_stages": 3, **options}
        try:
            kernel = triton.compile(ASTSource(fn, signature, consts), target=TARGET, options=opts)
        except Exception as exc:  # noqa: BLE001 - all failures are reported together
            failures.append(f"{fn.__name__} {consts}: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        if args.report:
            regs, stack, spills = _resource_usage(kernel.asm["cubin"])
            dtypes = sorted({v for v in signature.values() if v.startswith("*")})
            rows.append((fn.__name__, ",".join(dtypes), opts["num_warps"], kernel.metadata.shared, regs, stack + spills, consts))
    if failures:
        print("\n\n".join(failures), file=sys.stderr)
        return 1
    for name, dtypes, warps, shared, regs, spills, consts in sorted(rows, key=lambda r: (r[0], -r[5], -r[3])):
        blocks = {k: v for k, v in consts.items() if k.startswith(("BLOCK", "E", "K", "PRE", "N_PER", "ATOMIC"))}
        print(f"{name:36s} {dtypes:18s} warps={warps} smem={shared / 1024:6.1f}KiB regs={regs:3d} stack+local={spills:5d}B {blocks}")
    print(f"compiled {len(_launches)} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
