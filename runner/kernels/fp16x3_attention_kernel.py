"""The Triton program behind runner.kernels.fp16x3_attention (see there for the maths).

Its own module because Triton reads TRITON_INTERPRET when these functions are defined: runner.kernels.fp16x3_attention
imports it on first use, and the CPU tests import it (again) with the interpreter switched on.
"""

import triton
import triton.language as tl


@triton.jit
def split_rows(x):
    """x [R, C] float32 as FP16 hi + lo of x * scale, with scale a power of two per row putting the row's
    largest |value| in [2^14, 2^15); returns hi, lo and 1 / scale [R]."""
    amax = tl.max(tl.abs(x), axis=1)  # [R]
    biased_exponent = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # amax = 1.m * 2^(e - 127)
    # scale = 2^(14 - (e - 127)); its biased exponent 268 - e, kept where scale and 1 / scale are normal.
    scale_field = tl.minimum(tl.maximum(268 - biased_exponent, 1), 253)  # [R]
    scale = (scale_field << 23).to(tl.float32, bitcast=True)  # [R]
    inverse = ((254 - scale_field) << 23).to(tl.float32, bitcast=True)  # [R]
    scaled = x * scale[:, None]  # [R, C], exact
    hi = scaled.to(tl.float16)  # [R, C], rounded to nearest
    lo = (scaled - hi.to(tl.float32)).to(tl.float16)  # [R, C], |lo| <= 2^-11 |scaled|
    return hi, lo, inverse


@triton.jit
def split(x):
    """x float32, already in FP16's range, as FP16 hi + lo."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # [T, H, hd] each, channel stride 1
    v_scale_ptr,  # float32 [H, hd]: column_scale(v)
    slopes_ptr,  # float32 [H] ALiBi slopes (read only when ALIBI)
    cu_ptr,  # int32 [B+1] sequence offsets
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h,
    score_scale,  # softmax scale * log2(e): scores are kept in base 2
    head_dim,  # channels per head (HEAD_DIM is its power-of-two padding)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIBI: tl.constexpr,
):
    sequence = tl.program_id(0)  # axis 0: up to 2^31 - 1 programs (axes 1 and 2 stop at 65535)
    block = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + sequence)
    length = tl.load(cu_ptr + sequence + 1) - start
    if block * BLOCK_M >= length:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query positions in the sequence
    channels = tl.arange(0, HEAD_DIM)  # [HD]
    channel_ok = channels < head_dim  # [HD]
    row_ok = rows < length  # [BM]
    token = (start + rows).to(tl.int64)  # [BM]: offsets can pass 2^31 in big batches
    q = tl.load(
        q_ptr + token[:, None] * q_stride_t + head * q_stride_h + channels[None, :],
        mask=row_ok[:, None] & channel_ok[None, :], other=0.0,
    ).to(tl.float32)  # [BM, HD]
    q_hi, q_lo, q_inverse = split_rows(q)  # [BM, HD] x2, [BM]
    row_factor = q_inverse * score_scale  # [BM]: undoes q's scale and applies the softmax scale
    v_scale = tl.load(v_scale_ptr + head * head_dim + channels, mask=channel_ok, other=1.0)  # [HD]
    slope = 0.0
    if ALIBI:
        slope = tl.load(slopes_ptr + head) * 1.4426950408889634  # in base 2, like the scores

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BM]
    running_sum = tl.zeros([BLOCK_M], tl.float32)  # [BM]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # [BM, HD], scaled by 2^14 * v_scale
    for key_start in tl.range(0, length, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)  # [BN] key positions in the sequence
        key_ok = keys < length  # [BN]
        key_token = (start + keys).to(tl.int64)  # [BN]
        kv_mask = key_ok[:, None] & channel_ok[None, :]  # [BN, HD]
        k = tl.load(k_ptr + key_token[:, None] * k_stride_t + head * k_stride_h + channels[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BN, HD]
        k_hi, k_lo, k_inverse = split_rows(k)  # [BN, HD] x2, [BN]
        # The two correction products first, then the large one: the FP32 sum loses least that way.
        raw = tl.dot(q_lo, tl.trans(k_hi))  # [BM, BN]
        raw = tl.dot(q_hi, tl.trans(k_lo), raw)
        raw = tl.dot(q_hi, tl.trans(k_hi), raw)
        scores = raw * row_factor[:, None] * k_inverse[None, :]  # [BM, BN], base-2 logits
        if ALIBI:
            distance = tl.abs(rows[:, None] - keys[None, :]).to(tl.float32)  # [BM, BN]
            scores = scores - slope * distance
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # [BM]
        decay = tl.exp2(running_max - new_max)  # [BM]; 0 on the first block
        p = tl.exp2(scores - new_max[:, None])  # [BM, BN] in [0, 1]
        running_sum = running_sum * decay + tl.sum(p, axis=1)
        p_hi, p_lo = split(p * 16384.0)  # [BM, BN] x2: 2^14 p, exact, inside FP16's range
        v = tl.load(v_ptr + key_token[:, None] * v_stride_t + head * v_stride_h + channels[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BN, HD]
        v_hi, v_lo = split(v * v_scale[None, :])  # [BN, HD] x2
        update = tl.dot(p_lo, v_hi)  # [BM, HD]
        update = tl.dot(p_hi, v_lo, update)
        update = tl.dot(p_hi, v_hi, update)
        acc = acc * decay[:, None] + update
        running_max = new_max
    out = acc / (running_sum[:, None] * 16384.0 * v_scale[None, :])  # [BM, HD]
    tl.store(out_ptr + token[:, None] * o_stride_t + head * o_stride_h + channels[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & channel_ok[None, :])

