"""Compile the CBSA kernels for an H200 (sm_90) without a GPU, through Triton's whole pipeline to
a cubin (ptxas comes with Triton), and print each kernel's shared memory. Triton's interpreter
accepts code that its compiler rejects (types, constexpr branches, dot shapes); this catches that
on a CPU machine. Run in a process without TRITON_INTERPRET (tests/test_cbsa_kernels.py does).

    python tests/compile_kernels.py bf16:64 fp32:32
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import cbtlab.attention.cbsa_triton as kernels

H200 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on an H100/H200
FLOAT32_POINTERS = {"ACC", "MAX", "SUM", "PART", "LSE", "DELTA"}
POINTERS = FLOAT32_POINTERS | {"W", "Q0", "C", "OUT", "DOUT", "DAW", "DW"}
FLOATS = {"scale", "scale2"}
KERNELS = [
    ("extract", kernels._extract_kernel, {}),
    ("broadcast", kernels._broadcast_kernel, {}),
    ("reps_grad dC", kernels._reps_grad_kernel, {"MODE": 0}),
    ("reps_grad dQ0", kernels._reps_grad_kernel, {"MODE": 1}),
    ("tokens_grad", kernels._tokens_grad_kernel, {}),
]


def compile_kernel(fn: triton.JITFunction, dtype: str, head_dim: int, **constants: object) -> int:
    """Compile one kernel for the H200; returns its shared memory in bytes."""
    constants = {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_P": head_dim,
        "PREC": "ieee" if dtype == "fp32" else "tf32",
        **constants,
    }
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
    )
    compiled = triton.compile(source, target=H200, options={"num_warps": 4, "num_stages": 2})
    return int(compiled.metadata.shared)


def main(cases: list[str]) -> int:
    if kernels.INTERPRETED:
        print("unset TRITON_INTERPRET: the interpreter's kernels are not compiled", file=sys.stderr)
        return 2
    for case in cases:
        dtype, head_dim = case.split(":")
        for name, fn, constants in KERNELS:
            shared = compile_kernel(fn, dtype, int(head_dim), **constants)
            fits = "fits" if shared <= SHARED_LIMIT else "TOO LARGE"
            print(f"{dtype} p={head_dim} {name}: {shared} bytes of shared memory ({fits})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
