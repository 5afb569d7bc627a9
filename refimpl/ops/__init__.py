"""The readable NumPy specification of every openPangu operator.

Each operator takes arrays in a storage dtype (float64, float32, bfloat16, float16), computes
in float64 (for float64 input) or float32 (otherwise) and returns the storage dtype, rounding
at the cast points listed in `refimpl.numerics`.
"""

from .attention import attention, attention_query_blocks, causal_mask
from .basic import add, embedding, linear, silu, softmax
from .mlp import silu_and_mul, swiglu
from .moe import (moe_block, moe_experts, moe_route_block, moe_unpermute, moge_route, moge_vote,
                  near_ties, routing_margins)
from .moe_ep import (expert_rank, global_topk_ids, load_spread, moe_block_ep, moe_ep_combine,
                     rank_loads, token_shards)
from .moe_stages import group_bounds, grouped_matmul, moe_combine, moe_dispatch
from .norm import rms_norm
from .quant import (decode_deq_scale, dequant_swiglu_quant, dequantize, dynamic_quantize,
                    encode_deq_scale, group_dequantize, int8_matmul, kv_dequantize,
                    kv_quantize, quant_grouped_matmul, quant_matmul, quant_moe_block,
                    quantize,
                    static_quantize, w8a8_linear)
from .rope import apply_rope, apply_rope_interleaved, rope_tables, rotate_half
from .rejection import recovery_probs, rejection_sample
from .sampling import sample, sampling_probs
from .serving import (add_rms_norm, allocate_blocks, attention_varlen, check_paged,
                      check_varlen, cos_sin_cache, gather_paged, paged_attention, qkv_proj, reshape_and_cache, rope_cache,
                      swiglu_w13)

__all__ = ["add", "attention", "attention_query_blocks", "causal_mask", "embedding", "linear",
           "silu", "softmax", "swiglu",
           "moe_block", "moe_block_ep", "moe_experts", "moe_route_block", "moe_unpermute",
           "moge_route", "moge_vote", "near_ties", "routing_margins", "rms_norm", "apply_rope",
           "apply_rope_interleaved", "rope_tables", "rotate_half", "sample",
           "sampling_probs", "rejection_sample", "recovery_probs",
           "quantize", "static_quantize", "dynamic_quantize", "int8_matmul", "dequantize",
           "quant_matmul", "w8a8_linear", "quant_grouped_matmul", "quant_moe_block", "dequant_swiglu_quant",
           "group_dequantize", "kv_quantize", "kv_dequantize", "decode_deq_scale",
           "encode_deq_scale"]
