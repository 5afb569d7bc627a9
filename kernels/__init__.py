"""Numba fast paths for every hot operator of `refimpl.ops`, same names and signatures.

    from refimpl import kernels as K
    y = K.linear(x, w, b)            # x, w in float64/float32/bfloat16/float16

Accelerated: linear, rms_norm, apply_rope, attention, add, swiglu, moge_route, moe_block,
paged_attention, attention_varlen, add_rms_norm, and the MoE stages moe_dispatch,
grouped_matmul (plus grouped_gate_up, its fused gate-up SwiGLU form), moe_combine, and the
W8A8 int8 matmul (`quant`: int8_matmul, with quant_matmul, w8a8_linear and
quant_grouped_matmul running the spec's formulas on it; quantize, dynamic_quantize,
dequantize and dequant_swiglu_quant are the spec's, elementwise).
Re-exported from the spec unchanged: embedding (a gather), softmax, silu, silu_and_mul,
rope_tables, rotate_half, apply_rope_interleaved, causal_mask, sample, sampling_probs,
rejection_sample (the speculative decoder's acceptance rule: per-sequence control flow, no
hot loop), recovery_probs, near_ties,
routing_margins, and (no fast path yet) the serving-boundary operators
reshape_and_cache, gather_paged, cos_sin_cache, rope_cache, qkv_proj,
swiglu_w13. `paged_attention` has its kernel (decode through the block table, in place),
`attention_varlen` its (one parallel loop over every sequence's head and query blocks).

Conventions (see each module's docstring for its kernel):

* Inputs arrive in a storage dtype exactly as the spec gets them and outputs come back in
  it. bfloat16 and float16 enter Numba as raw 16-bit views (`_dtypes`), are widened exactly
  to float32 in registers and rounded back to nearest even; float64 stays float64.
* The cast points of `refimpl.numerics` are followed everywhere by default, so kernel and
  spec differ only in the order of long sums and in exp (the kernels' float32 `exp32`,
  within 1 ulp, against NumPy's): on inputs whose sums are exact in any order the kernels
  equal the spec bit for bit (linear in every mode; swiglu, moe_block and attention in
  bf16/fp16, tests/test_kernels.py). The one deliberate difference is opt-in:
  `attention(..., flash=True)`, an online-softmax prefill that keeps the probabilities in
  float32 (normwise 7e-3 from the spec in bf16, ~2 bf16 ulps).
* No fast-math. Dot products use explicit vector code (`_vec`) with a fixed summation order
  and IEEE fused multiply-add, so a result does not depend on the thread count, on the tile
  it was computed in, on the ISA (AVX2 and AVX-512 give the same bits: tests/test_kernels.py
  compiles for a narrower ISA in a subprocess), or on the compiler's choices. Threads split
  only independent outputs. No BLAS either (see `linear`).
* Compiled by `_jit.jit` (`numba.njit(cache=True)` at LLVM -O1, which leaves the explicit
  vector code as fast as -O3 and compiles in 70% of the time); the loops over independent
  work items are `_jit.driver`s, compiled in a serial form and, only when an input first
  needs the thread pool, a parallel one. The first call of the kernels of a dtype compiles
  them (`python -m refimpl bench --only compile`: 8-12 s on small inputs, 5-6 s more at
  real width, on the project's machine), later processes load them from the cache. The
  cache lives in a directory named after a hash of every kernel source file
  (`_cache.cache_dir`, kernels/__pycache__/numba-HASH), because Numba's own index only
  notices edits to the file a function is defined in, not to the helpers it inlines (`_vec`,
  `_dtypes`): an edit anywhere in kernels/ starts a fresh cache, and code compiled from
  older sources is never served.
* Small calls (less than `_dtypes.PARALLEL_MIN_WORK` operations) run on the calling thread
  (the serial form); REFIMPL_PARALLEL_MIN_WORK=0 forces every kernel onto the thread pool.
* Unusual dtype mixes or shapes (where a kernel could not reproduce the spec exactly) fall
  back to the spec operator.
"""

from ._cache import use_source_keyed_cache

#: every kernel computes an output row by the same code whatever the other rows (no BLAS, a
#: fixed summation order per row): `Model.step` may run a packed batch through them at once
ROWS_INDEPENDENT = True

use_source_keyed_cache()  # before any kernel module is compiled or loaded from a cache

from refimpl.ops import (apply_rope_interleaved, causal_mask,
                         cos_sin_cache, embedding, gather_paged, near_ties, qkv_proj,
                         reshape_and_cache, rope_cache, rope_tables, rotate_half,
                         routing_margins, sample, sampling_probs, rejection_sample,
                         recovery_probs, silu, silu_and_mul, softmax, swiglu_w13,
                         quantize, static_quantize, dynamic_quantize, dequantize,
                         dequant_swiglu_quant, group_dequantize, kv_quantize, kv_dequantize,
                         decode_deq_scale, encode_deq_scale)

from ._dtypes import round_to_bf16, round_to_f16
from .attention import attention, attention_varlen, paged_attention
from .basic import add
from .linear import linear
from .mlp import swiglu
from .moe import moe_block, moge_route
from .moe_stages import grouped_gate_up, grouped_matmul, moe_combine, moe_dispatch
from .norm import add_rms_norm, rms_norm
from .quant import (int8_matmul, quant_grouped_matmul, quant_matmul, quant_moe_block,
                    w8a8_linear)
from .rope import apply_rope

__all__ = ["add", "attention", "causal_mask", "embedding", "linear", "silu", "softmax", "swiglu",
           "moe_block", "moge_route", "near_ties", "routing_margins", "rms_norm", "apply_rope",
           "apply_rope_interleaved", "rope_tables", "rotate_half", "sample", "sampling_probs",
           "rejection_sample", "recovery_probs", "round_to_bf16",
           "round_to_f16", "silu_and_mul", "moe_dispatch", "grouped_matmul", "grouped_gate_up",
           "moe_combine", "attention_varlen", "reshape_and_cache",
           "gather_paged", "paged_attention", "add_rms_norm", "cos_sin_cache", "rope_cache",
           "qkv_proj", "swiglu_w13", "int8_matmul", "quant_matmul", "w8a8_linear",
           "quant_grouped_matmul", "quant_moe_block", "quantize", "static_quantize", "dynamic_quantize",
           "dequantize", "dequant_swiglu_quant", "group_dequantize", "kv_quantize",
           "kv_dequantize", "decode_deq_scale", "encode_deq_scale"]
