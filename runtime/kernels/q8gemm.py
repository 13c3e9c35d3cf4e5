"""Prefill matmul as a GEMM (Q4_K, Q5_K, Q6_K, IQ4_XS, Q4_0, Q5_0, Q8_0): a tile of weight rows decoded
once to int8 in L1, every token of the batch run over it with the tokens in the vector lanes.

Why this shape: the row dots of q8dot.py put a weight block's elements in the lanes, so
each block and activation vector ends in shuffles to join lanes and a conversion to float
(~20 instructions per block and token beside the 4 multiplies). Here lane i of a register
is token i: one instruction multiplies 4 weights of one row (the same 4 bytes broadcast
into every lane) by the 4 matching activation bytes of 16 (AVX-512), 8 (AVX2) or 4 tokens
at once, and a sub-block's scale is one lane-wise multiply. Nothing is joined across lanes.

Blocks read (kquants.py spells them out): Q4_K (144 bytes): d, dmin:f16, scales[12] (eight
6-bit scales and mins), qs[128], element 64c + l the low nibble of qs[32c + l], 64c + 32 + l
its high nibble. Q5_K (176): as Q4_K with qh[32] between scales and qs, bit k of qh[l] the
fifth bit of element 32k + l. IQ4_XS (136): d, scales_h:u16, scales_l[4], qs[128]; group g of
32 has qs[16g:16g+16] as Q4_0's nibbles, weight K[q] of ggml's 16-level codebook K, scale
(nibble g % 2 of scales_l[g // 2] | bits 2g.. of scales_h << 4) - 32. Q6_K (210 bytes): ql[128], qh[64], scales[16] int8, d:f16, element
128h + 32j + l from a nibble of ql[64h + 32(j % 2) + l] and bits 2j.. of qh[32h + l], q - 32.
Blocks of 32 (legacy.py): Q4_0 (18): d:f16, qs[16], element i < 16 the low nibble of qs[i],
i >= 16 the high nibble of qs[i - 16], q - 8. Q5_0 (22): d, qh:u32, qs[16]; bit i of qh is
element i's fifth bit, q - 16. Q8_0 (34): d, qs[32] int8.

The weights stay in their memory-mapped blocks; what is decoded is a transient tile of
ROWS rows, rewritten for every group of rows:
- tile (int8, ROWS x cols, row-major): one signed byte per weight, the integer the format
  stores: Q4_K q (0..15); Q5_K q (0..31); IQ4_XS K[q] (-127..113); Q6_K q - 32 (-32..31); Q4_0 q - 8; Q5_0 q - 16; Q8_0 q.
- scal (int32, 32 per row and super-block of 256): [0:16] the sub-block scales (8 used by
  formats with sub-blocks of 32), [16:24] the minimums as int16 pairs (m_a | m_b << 16) for
  the activation sums of elements 32p..32p+15 and 32p+16..32p+31, [24] C = sum over the
  block of scale * weight byte (the bias below), [25] d and [26] dmin as float32 bits.
  Blocks of 32: 2 per row and block, C (the sum of its weight bytes) and d.

The activations are Q8_K (q8.py; Q8_0, per 32, for the blocks of 32), interleaved once per
matmul so that a token group of LANES tokens reads as vectors (token t = LANES * group + lane):
- xi (int32[groups, cols / 4, LANES]): the 4 activation bytes of token t at elements 4k..4k+3,
  each plus 128 (so unsigned: the multiply instructions take one unsigned operand, and the
  weights, signed, are the other). sum(w * (y + 128)) = sum(w * y) + 128 * sum(w), and
  128 * C per row and block takes the bias out again: exact integers.
- ysi (int32[groups, cols / 32, LANES]): the int16 activation sums of elements 32p..32p+15
  and 32p+16..32p+31 of token t, as one int32 (low, high), for the minimums.
- ydi (float32[groups, cols / 256 or cols / 32, LANES]): the activation scale of each block.

Per row, token and super-block the kernel computes, as ggml's vec_dot_q4_K_q8_K does:
d * yd * sum_s(scale_s * sum(q * y)) - dmin * yd * sum_s(min_s * ysum_s), the integer sums
exact; only the float32 accumulation over super-blocks rounds.
"""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
import numpy as np

from runtime.ggml_types import IQ4_XS, Q4_0, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0

from .common import F16_TO_F32
from . import simd
from .q8dot import IQ4_LEVELS, _Emit, _k4_scales_mins, _nibbles32, iq4_xs_scales

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()

# Tokens per vector: the int32 lanes of the tier's widest integer register.
LANES = {"vnni512": 16, "avx512": 16, "vnni256": 8, "avx2": 8}.get(simd.integer_isa(), 4)
# Weight rows per tile: the rows whose sums for one token group stay in registers.
ROWS = 8
SCAL = 32  # int32 per row and super-block in scal


def _v(n, t=_I8):
    return ir.VectorType(t, n)


def _c64(v):
    return ir.Constant(_I64, v)


def _reduce_add(builder, vec):
    n, t = vec.type.count, vec.type.element
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [vec.type]),
                                       f"llvm.vector.reduce.add.v{n}i{t.width}")
    return builder.call(f, [vec])


def _splat(builder, value, n):
    return simd._splat_value(builder, value, _v(n, value.type))


# --------------------------------------------------------------------------- tile decoders

def _decoder(block_bytes, body, elems=256, per_block=SCAL):
    """An intrinsic f(raw, off, nblocks, tile, t_off, scal, s_off, table): the `nblocks`
    blocks (of `elems` weights) at raw[off] decoded into tile[t_off:] (`elems` bytes each)
    and scal[s_off:] (`per_block` int32 each). body(e, blk, w, s) emits one block: blk its
    bytes, w its tile bytes, s its int32s."""

    @intrinsic
    def decode(typingctx, raw, off, nblocks, tile, t_off, scal, s_off, table):
        sig = types.void(raw, types.int64, types.int64, tile, types.int64, scal, types.int64, table)

        def codegen(context, builder, sig, args):
            def data(i):
                return context.make_array(sig.args[i])(context, builder, args[i]).data

            rawp, tilep, scalp = data(0), data(3), data(5)
            e = _Emit(builder, data(7))
            with cgutils.for_range(builder, args[2]) as loop:
                b = loop.index
                blk = e.at(rawp, builder.add(args[1], builder.mul(b, _c64(block_bytes))))
                w = e.at(tilep, builder.add(args[4], builder.mul(b, _c64(elems))))
                s = builder.gep(scalp, [builder.add(args[6], builder.mul(b, _c64(per_block)))])
                body(e, blk, w, s)
            return context.get_dummy_value()

        return sig, codegen

    return decode


def _store(e, ptr, off, value):
    e.b.store(value, e.b.bitcast(e.at(ptr, off), value.type.as_pointer()), align=1)


def _store_i32(e, s, index, value):
    e.b.store(value, e.b.gep(s, [_c64(index)]))


def _store_f32(e, s, index, value):
    e.b.store(e.b.bitcast(value, _I32), e.b.gep(s, [_c64(index)]))


def _sub_sums(e, values, sub):
    """The int32 sums of each `sub` consecutive bytes of <n x i8> values (signed)."""
    b = e.b
    n = values.type.count
    return [b.sext(_reduce_add(b, b.sext(e.pick(values, list(range(k, k + sub))), _v(sub, _I16))), _I32)
            for k in range(0, n, sub)]


def _bias(e, scales, sums):
    """C = sum(scale * sum of weight bytes) over the sub-blocks (int32 scalars)."""
    total = ir.Constant(_I32, 0)
    for sc, sm in zip(scales, sums):
        total = e.b.add(total, e.b.mul(sc, sm))
    return total


def _lanes(e, vec):
    return [e.b.extract_element(vec, ir.Constant(_I32, i)) for i in range(vec.type.count)]


def _q4_k_tile(e, blk, w, s, qs_off=16, qh_off=None):
    """Q4_K: weight bytes q (0..15), 8 scales and minimums; Q5_K (qh_off): q (0..31), the
    fifth bit of sub-block 2c + h bit 2c + h of qh[l]."""
    b = e.b
    scales, mins = _k4_scales_mins(e, blk)
    high_bits = e.load(blk, qh_off, _v(32)) if qh_off is not None else None
    sums = []
    for c in range(4):  # 32 bytes of qs: sub-blocks 2c (low nibbles) and 2c + 1 (high)
        q = e.load(blk, qs_off + 32 * c, _v(32))
        low, high = e.mask(q, 15), e.shr(q, 4)
        if high_bits is not None:
            low = b.or_(low, e.shl(e.bits(high_bits, 2 * c, 1), 4))
            high = b.or_(high, e.shl(e.bits(high_bits, 2 * c + 1, 1), 4))
        _store(e, w, 64 * c, low)
        _store(e, w, 64 * c + 32, high)
        sums += _sub_sums(e, e.cat(low, high), 32)
    sc = _lanes(e, scales)
    for i, v in enumerate(sc):
        _store_i32(e, s, i, v)
    for p, m in enumerate(_lanes(e, mins)):
        _store_i32(e, s, 16 + p, b.or_(m, b.shl(m, ir.Constant(_I32, 16))))
    _store_i32(e, s, 24, _bias(e, sc, sums))
    _store_f32(e, s, 25, e.f16(blk, 0))
    _store_f32(e, s, 26, e.f16(blk, 2))


def _q5_k_tile(e, blk, w, s):
    """Q5_K: as Q4_K with qh[32] at byte 16 and qs after it."""
    _q4_k_tile(e, blk, w, s, qs_off=48, qh_off=16)


def _iq4_xs_tile(e, blk, w, s):
    """IQ4_XS: weight bytes the codebook's levels (-127..113), 8 signed scales ls - 32."""
    b = e.b
    sc = _lanes(e, iq4_xs_scales(e, blk))
    sums = []
    for g in range(8):  # group g: qs[16g:16g+16] as IQ4_NL
        q = simd.byte_lookup(b, IQ4_LEVELS, _nibbles32(e, blk, 8 + 16 * g))
        _store(e, w, 32 * g, q)
        sums += _sub_sums(e, q, 32)
    for i, v in enumerate(sc):
        _store_i32(e, s, i, v)
    _store_i32(e, s, 24, _bias(e, sc, sums))
    _store_f32(e, s, 25, e.f16(blk, 0))


def _q6_k_tile(e, blk, w, s):
    """Q6_K: weight bytes q - 32 (-32..31), 16 signed scales."""
    b = e.b
    sums = []
    for h in range(2):
        low = e.load(blk, 64 * h, _v(64))
        high = e.load(blk, 128 + 32 * h, _v(32))
        for j2, nib in ((0, e.mask(low, 15)), (2, e.shr(low, 4))):  # elements 128h + 32*j2 + [0:64]
            top = e.mask(e.cat(e.shr(high, 2 * j2), e.shr(high, 2 * j2 + 2)), 3)
            q = b.sub(b.or_(nib, e.shl(top, 4)), ir.Constant(_v(64), [32] * 64))
            _store(e, w, 128 * h + 32 * j2, q)
            sums += _sub_sums(e, q, 16)
    sc = _lanes(e, b.sext(e.load(blk, 192, _v(16)), _v(16, _I32)))
    for i, v in enumerate(sc):
        _store_i32(e, s, i, v)
    _store_i32(e, s, 24, _bias(e, sc, sums))
    _store_f32(e, s, 25, e.f16(blk, 208))


def _q4_0_tile(e, blk, w, s):
    """Q4_0: weight bytes q - 8 (-8..7)."""
    q = e.b.sub(_nibbles32(e, blk, 2), ir.Constant(_v(32), [8] * 32))
    _legacy_store(e, w, s, q, e.f16(blk, 0))


def _q5_0_tile(e, blk, w, s):
    """Q5_0: weight bytes q - 16 (-16..15), the fifth bit of element i bit i of qh."""
    b = e.b
    q = b.or_(_nibbles32(e, blk, 6), e.bits32_bytes(e.load(blk, 2, _I32), 16))
    _legacy_store(e, w, s, b.sub(q, ir.Constant(_v(32), [16] * 32)), e.f16(blk, 0))


def _q8_0_tile(e, blk, w, s):
    """Q8_0: the weight bytes as stored (int8)."""
    _legacy_store(e, w, s, e.load(blk, 2, _v(32)), e.f16(blk, 0))


def _legacy_store(e, w, s, q, d):
    _store(e, w, 0, q)
    _store_i32(e, s, 0, _sub_sums(e, q, 32)[0])
    _store_f32(e, s, 1, d)


# ------------------------------------------------------------------------ the micro-kernel

def _gemm_intrinsic(emit):
    """The intrinsic f(tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out) whose
    code emit(builder, data, args) writes (data(i): argument i's data pointer)."""

    @intrinsic
    def gemm(typingctx, tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out):
        sig = types.void(tile, types.int64, scal, xi, types.int64, ysi, types.int64, ydi, types.int64,
                         types.int64, out)

        def codegen(context, builder, sig, args):
            def data(i):
                return context.make_array(sig.args[i])(context, builder, args[i]).data

            emit(builder, data, args)
            return context.get_dummy_value()

        return sig, codegen

    return gemm


def _gemm(sub, has_min, rows=ROWS, lanes=LANES):
    """An intrinsic f(tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out):
    out[r * lanes + i] = row r of the tile . token i of the group at xi[x_off] (ysi[ys_off],
    ydi[yd_off]), for formats with sub-blocks of `sub` (16 or 32) and, if has_min, minimums."""
    isa = simd.integer_isa()
    vnni = isa.startswith("vnni")
    nsub = 256 // sub

    def emit(builder, data, args):
        tile_, cols_, scal_, xi_, x_off_, ysi_, ys_off_, ydi_, yd_off_, nblocks_, out_ = args
        b = builder
        e = _Emit(b, None)
        tilep, scalp, outp = data(0), data(2), data(10)
        xip = b.bitcast(b.gep(data(3), [x_off_]), _I8.as_pointer())
        ysp = b.gep(data(5), [ys_off_])
        ydp = b.gep(data(7), [yd_off_])
        vi, vf = _v(lanes, _I32), _v(lanes, _F32)
        zero_i = ir.Constant(vi, None)
        sums = [cgutils.alloca_once_value(b, ir.Constant(vf, None)) for _ in range(rows)]
        row_tile = [b.gep(tilep, [b.mul(cols_, _c64(r))]) for r in range(rows)]
        s_stride = b.mul(nblocks_, _c64(SCAL))
        row_scal = [b.gep(scalp, [b.mul(s_stride, _c64(r))]) for r in range(rows)]
        with cgutils.for_range(b, nblocks_) as loop:
            blk = loop.index
            xb = b.gep(xip, [b.mul(blk, _c64(256 * lanes))])
            wb = [b.gep(p, [b.mul(blk, _c64(256))]) for p in row_tile]
            sb = [b.gep(p, [b.mul(blk, _c64(SCAL))]) for p in row_scal]
            totals = [cgutils.alloca_once_value(b, zero_i) for _ in range(rows)]
            # The sub-blocks as a loop, not unrolled: unrolled, LLVM's scheduler interleaved
            # several sub-blocks' accumulators and spilled them (measured 0-30% slower).
            with cgutils.for_range(b, _c64(nsub)) as sub_loop:
                si = sub_loop.index
                scale = [b.load(b.gep(sb[r], [si])) for r in range(rows)]
                total = [b.load(p) for p in totals]
                acc = [zero_i] * rows
                first = b.mul(si, _c64(sub))
                for g in range(sub // 4):
                    k = b.add(first, _c64(4 * g))
                    a = e.load(xb, b.mul(k, _c64(lanes)), _v(4 * lanes))
                    for r in range(rows):
                        wv = b.bitcast(_splat(b, e.load(wb[r], k, _I32), lanes), _v(4 * lanes))
                        if vnni:
                            acc[r] = simd.dot4_acc(b, acc[r], a, wv)
                        else:
                            total[r] = simd.dot4_scaled(b, a, wv, _splat(b, b.trunc(scale[r], _I16), lanes),
                                                        total[r])
                for r in range(rows):
                    if vnni:
                        total[r] = b.add(total[r], b.mul(acc[r], _splat(b, scale[r], lanes)))
                    b.store(total[r], totals[r])
            total = [b.load(p) for p in totals]
            yd = b.load(b.bitcast(b.gep(ydp, [b.mul(blk, _c64(lanes))]), vf.as_pointer()), align=4)
            if has_min:
                ys_block = b.gep(ysp, [b.mul(blk, _c64(8 * lanes))])
                ys = [b.bitcast(b.load(b.bitcast(b.gep(ys_block, [_c64(p * lanes)]), vi.as_pointer()), align=4),
                                _v(2 * lanes, _I16)) for p in range(8)]
            for r in range(rows):
                bias = b.shl(b.load(b.gep(sb[r], [_c64(24)])), ir.Constant(_I32, 7))
                exact = b.sub(total[r], _splat(b, bias, lanes))
                d = b.bitcast(b.load(b.gep(sb[r], [_c64(25)])), _F32)
                value = b.fmul(b.sitofp(exact, vf), b.fmul(_splat(b, d, lanes), yd), flags=("fast",))
                if has_min:
                    mins = None
                    for p in range(8):
                        pair = b.bitcast(_splat(b, b.load(b.gep(sb[r], [_c64(16 + p)])), lanes),
                                         _v(2 * lanes, _I16))
                        part = simd.madd16(b, ys[p], pair)
                        mins = part if mins is None else b.add(mins, part)
                    dmin = b.bitcast(b.load(b.gep(sb[r], [_c64(26)])), _F32)
                    value = b.fsub(value, b.fmul(b.sitofp(mins, vf), b.fmul(_splat(b, dmin, lanes), yd),
                                                 flags=("fast",)), flags=("fast",))
                b.store(b.fadd(b.load(sums[r]), value, flags=("fast",)), sums[r])
        for r in range(rows):
            dst = b.bitcast(b.gep(outp, [_c64(r * lanes)]), vf.as_pointer())
            b.store(b.load(sums[r]), dst, align=4)

    return _gemm_intrinsic(emit)


def _gemm32(rows=ROWS, lanes=LANES):
    """The legacy formats' GEMM: f(tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off,
    nblocks, out) as _gemm's, over `nblocks` blocks of 32, each with its own weight scale d
    (scal: [bias, d] per row and block) and activation scale (ydi per block of 32)."""

    def emit(builder, data, args):
        b = builder
        e = _Emit(b, None)
        cols_, x_off_, yd_off_, nblocks_ = args[1], args[4], args[8], args[9]
        xip = b.bitcast(b.gep(data(3), [x_off_]), _I8.as_pointer())
        ydp = b.gep(data(7), [yd_off_])
        vi, vf = _v(lanes, _I32), _v(lanes, _F32)
        sums = [cgutils.alloca_once_value(b, ir.Constant(vf, None)) for _ in range(rows)]
        row_tile = [b.gep(data(0), [b.mul(cols_, _c64(r))]) for r in range(rows)]
        row_scal = [b.gep(data(2), [b.mul(nblocks_, _c64(2 * r))]) for r in range(rows)]
        with cgutils.for_range(b, nblocks_) as loop:
            blk = loop.index
            xb = b.gep(xip, [b.mul(blk, _c64(32 * lanes))])
            acc = [ir.Constant(vi, None)] * rows
            for g in range(8):
                a = e.load(xb, 4 * g * lanes, _v(4 * lanes))
                for r in range(rows):
                    k = b.add(b.mul(blk, _c64(32)), _c64(4 * g))
                    wv = b.bitcast(_splat(b, e.load(row_tile[r], k, _I32), lanes), _v(4 * lanes))
                    acc[r] = simd.dot4_acc(b, acc[r], a, wv)
            yd = b.load(b.bitcast(b.gep(ydp, [b.mul(blk, _c64(lanes))]), vf.as_pointer()), align=4)
            for r in range(rows):
                sb = b.gep(row_scal[r], [b.mul(blk, _c64(2))])
                bias = b.shl(b.load(sb), ir.Constant(_I32, 7))
                d = b.bitcast(b.load(b.gep(sb, [_c64(1)])), _F32)
                exact = b.sitofp(b.sub(acc[r], _splat(b, bias, lanes)), vf)
                value = b.fmul(exact, b.fmul(_splat(b, d, lanes), yd), flags=("fast",))
                b.store(b.fadd(b.load(sums[r]), value, flags=("fast",)), sums[r])
        for r in range(rows):
            dst = b.bitcast(b.gep(data(10), [_c64(r * lanes)]), vf.as_pointer())
            b.store(b.load(sums[r]), dst, align=4)

    return _gemm_intrinsic(emit)


decode_q4_k = _decoder(144, _q4_k_tile)
decode_q5_k = _decoder(176, _q5_k_tile)
decode_q6_k = _decoder(210, _q6_k_tile)
decode_iq4_xs = _decoder(136, _iq4_xs_tile)
decode_q4_0 = _decoder(18, _q4_0_tile, 32, 2)
decode_q5_0 = _decoder(22, _q5_0_tile, 32, 2)
decode_q8_0 = _decoder(34, _q8_0_tile, 32, 2)
gemm_q4_k = _gemm(32, True)
gemm_q6_k = _gemm(16, False)
gemm_iq4_xs = _gemm(32, False)
gemm_legacy = _gemm32()

# The formats with a GEMM. Q8_0's and IQ4_XS's weights reach +-127, where pmaddubsw (the
# tiers without VNNI) would saturate its pair sums (2 * 255 * 127 > 32767): their GEMM is on
# the VNNI tiers.
_VNNI = simd.integer_isa().startswith("vnni")
LEGACY_GEMM_TYPES = (Q4_0, Q5_0, Q8_0) if _VNNI else (Q4_0, Q5_0)
GEMM_TYPES = (Q4_K, Q5_K, Q6_K) + ((IQ4_XS,) if _VNNI else ()) + LEGACY_GEMM_TYPES


@njit(inline="always")
def has_gemm(type_id):
    return type_id in GEMM_TYPES


@njit(inline="always")
def _legacy(type_id):
    return type_id in LEGACY_GEMM_TYPES


@njit(inline="always")
def decode_tile(type_id, raw, off, nblocks, tile, t_off, scal, s_off):
    """The `nblocks` blocks of one row at raw[off] into tile[t_off:], scal[s_off:]."""
    t = F16_TO_F32
    if type_id == Q4_K:
        decode_q4_k(raw, off, nblocks, tile, t_off, scal, s_off, t)
    elif type_id == Q5_K:
        decode_q5_k(raw, off, nblocks, tile, t_off, scal, s_off, t)
    elif type_id == Q6_K:
        decode_q6_k(raw, off, nblocks, tile, t_off, scal, s_off, t)
    elif type_id == IQ4_XS:
        decode_iq4_xs(raw, off, nblocks, tile, t_off, scal, s_off, t)
    elif type_id == Q4_0:
        decode_q4_0(raw, off, nblocks, tile, t_off, scal, s_off, t)
    elif type_id == Q5_0:
        decode_q5_0(raw, off, nblocks, tile, t_off, scal, s_off, t)
    elif type_id == Q8_0:
        decode_q8_0(raw, off, nblocks, tile, t_off, scal, s_off, t)


@njit(inline="always")
def gemm_group(type_id, tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out):
    """The ROWS x LANES results of the tile and one token group into out (row after row)."""
    if type_id == Q4_K or type_id == Q5_K:  # Q5_K: the same sums, its q up to 31
        gemm_q4_k(tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out)
    elif type_id == Q6_K:
        gemm_q6_k(tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out)
    elif type_id == IQ4_XS:
        gemm_iq4_xs(tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out)
    else:
        gemm_legacy(tile, cols, scal, xi, x_off, ysi, ys_off, ydi, yd_off, nblocks, out)


@njit(inline="always")
def interleaved(groups, cols, block):
    """Empty (xi, ysi, ydi) for `groups` token groups of rows of `cols` elements, activation
    blocks of `block`."""
    return (np.empty(groups * (cols // 4) * LANES, np.int32), np.empty(groups * (cols // 32) * LANES, np.int32),
            np.empty(groups * (cols // block) * LANES, np.float32))


_BIAS = np.int32(-0x7F7F7F80)  # 0x80808080: +128 on each of 4 bytes (xor on two's complement)


@njit(inline="always")
def interleave(q, s, d, n, cols, block, xi, ysi, ydi, group):
    """Token group `group` of the activations (q, s, d: token after token, blocks of `block`)
    into the lane-interleaved xi, ysi, ydi (see the module docstring); tokens past n read as
    zeros."""
    L = LANES
    q32 = q.view(np.int32)
    s32 = s.view(np.int32)
    k4, k32, nb = cols // 4, cols // 32, cols // block
    for lane in range(L):
        t = group * L + lane
        if t < n:
            for k in range(k4):
                xi[(group * k4 + k) * L + lane] = q32[t * k4 + k] ^ _BIAS
            for p in range(k32):
                ysi[(group * k32 + p) * L + lane] = s32[t * k32 + p]
            for blk in range(nb):
                ydi[(group * nb + blk) * L + lane] = d[t * nb + blk]
        else:
            for k in range(k4):
                xi[(group * k4 + k) * L + lane] = _BIAS
            for p in range(k32):
                ysi[(group * k32 + p) * L + lane] = 0
            for blk in range(nb):
                ydi[(group * nb + blk) * L + lane] = 0.0


@njit(inline="always")
def gemm_rows(type_id, raw, row_bytes, rows, first, cols, xi, ysi, ydi, n, out):
    """out[:, first:first + ROWS] (rows past `rows` skipped) for all n tokens."""
    L = LANES
    legacy = _legacy(type_id)
    nb = cols // 32 if legacy else cols // 256
    per_block = 2 if legacy else SCAL
    tile = np.empty(ROWS * cols, np.int8)
    scal = np.empty(ROWS * nb * per_block, np.int32)
    sums = np.empty(ROWS * L, np.float32)
    for r in range(ROWS):
        row = min(first + r, rows - 1)
        decode_tile(type_id, raw, row * row_bytes, nb, tile, r * cols, scal, r * nb * per_block)
    count = min(ROWS, rows - first)
    for group in range((n + L - 1) // L):
        gemm_group(type_id, tile, cols, scal, xi, group * (cols // 4) * L, ysi, group * (cols // 32) * L,
                   ydi, group * nb * L, nb, sums)
        for lane in range(min(L, n - group * L)):
            t = group * L + lane
            for r in range(count):
                out[t, first + r] = sums[r * L + lane]
