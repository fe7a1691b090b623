"""Compile every Triton kernel of the triton backend for a CUDA architecture, without a GPU.

``python tests/triton_compile_check.py [ARCH]`` (default 90) runs Triton's whole CUDA pipeline (TTIR,
TTGIR, LLVM IR, PTX, ptxas) on one representative configuration per kernel, with the block sizes the
launchers use, and prints each kernel's shared memory. The interpreter never does this, so it is what
catches code that only a real compilation rejects. Run without ``TRITON_INTERPRET`` (the kernels must be
defined as compilable functions); ``test_triton_compile.py`` runs it in a subprocess.
"""
import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

MODULES = {name: importlib.import_module(f"alast_kernels.backends.triton.{name}")
           for name in ("attention", "mlp", "scores", "select", "tokens")}


def _compile(target, kernel, ptr_types, constexprs, floats=(), num_warps=4):
    """Compile ``kernel``: pointers typed by ``ptr_types`` (``"*"`` the default), ints i32, ``floats`` fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, ptr_types.get("*", "*fp32"))
        else:
            sig[name] = "fp32" if name in floats else "i32"
    compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=target, options={"num_warps": num_warps})
    print(f"ok {kernel.__name__} {sig.get('q_ptr', ptr_types.get('*'))} shared={compiled.metadata.shared}")
    return compiled


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    att, mlp, sco, sel, tok = (MODULES[n] for n in ("attention", "mlp", "scores", "select", "tokens"))
    bf16, i64 = "*bf16", "*i64"
    _compile(target, sel._select_kernel, {"scores_ptr": "*fp32", "out_ptr": i64}, {"P": 1, "BLOCK": 4096}, num_warps=8)
    rows = {"BLOCK_R": tok._BLOCK_ROWS, "BLOCK_D": tok._MAX_BLOCK_D}
    _compile(target, tok._gather_kernel, {"*": bf16, "idx_ptr": i64}, rows)
    _compile(target, tok._scatter_add_rows_kernel, {"*": bf16, "idx_ptr": i64, "acc_ptr": "*fp32"}, rows)
    _compile(target, tok._inverse_index_kernel, {"idx_ptr": i64, "pos_ptr": "*i32"}, {"BLOCK": 256})
    _compile(target, tok._scatter_kernel, {"*": bf16, "pos_ptr": "*i32"}, rows)
    stats = {"idx_ptr": i64, "mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
    _compile(target, tok._gather_ln_fwd_kernel, {"*": bf16, **stats},
             {"HAS_W": True, "HAS_B": False, "b_ptr": None, **rows}, floats=("eps",))
    _compile(target, tok._gather_ln_bwd_kernel,
             {"*": bf16, **stats, "dx_acc_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32"},
             {"HAS_W": True, "NEED_DX": True, "NEED_DW": True, "NEED_DB": True, **rows})
    _compile(target, sco._logits_kernel, {"*": "*fp32", "x_ptr": bf16}, {"BLOCK_N": 8, "BLOCK_D": 1024},
             floats=("eps",))
    _compile(target, sco._softmax_mean_kernel, {"*": "*fp32"}, {"BLOCK_N": 256, "BLOCK_H": 16, "BLOCK_C": 64})
    _compile(target, mlp._gelu_fwd_kernel, {"*": bf16}, {"TANH": False, "BLOCK": mlp._BLOCK})
    _compile(target, mlp._gelu_bwd_kernel, {"*": bf16, "db_ptr": "*fp32"},
             {"TANH": True, "WRITE_H": True, "NEED_DB": True, "BLOCK_M": mlp._BLOCK_M, "BLOCK_F": mlp._BLOCK_F})
    io = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "out_ptr": "*fp32"}
    for dtype, block in ((bf16, 64), ("*fp32", 32)):  # the launcher's blocks for 16-bit and float32
        c = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": 128, "PRECISION": "ieee"}
        _compile(target, att._attn_fwd_kernel, {"*": dtype, **io}, c, floats=("qk_scale",), num_warps=8)
        _compile(target, att._attn_bwd_dkdv_kernel, {"*": dtype, **io}, c, floats=("scale", "qk_scale"), num_warps=8)
        _compile(target, att._attn_bwd_dq_kernel, {"*": dtype, **io}, c, floats=("scale", "qk_scale"), num_warps=8)
    _compile(target, att._attn_bwd_delta_kernel, {"*": bf16, **io}, {"BLOCK_M": 64, "BLOCK_D": 128})
    _compile(target, att._cls_row_kernel, {"*": bf16, **io}, {"BLOCK_N": 64, "BLOCK_D": 128}, floats=("qk_scale",))
    print("all kernels compiled")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
