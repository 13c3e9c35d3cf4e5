"""Integer dot products of quantized weight rows with 8-bit activations, one per format.

Activations are quantized once per matvec/matmul (q8.py), as ggml's vec_dot_type:
- kind Q8_0, for the formats with blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4):
  int8 yq[n], float32 yd[n / 32] (x ~ yd * yq, |yq| <= 127), int16 ys[n / 16] (sums of
  yq in groups of 16);
- kind Q8_K, for the 256-weight super-blocks (Q2_K..Q6_K, IQ4_XS): the same with
  yd[n / 256].

Weight layouts (all little-endian; legacy.py and kquants.py spell them out in full):
- Q4_0 (18 bytes): d:f16, qs[16], weight i = d * (q_i - 8), q_i the low nibble of qs[i]
  (i < 16) or the high nibble of qs[i - 16]. Q4_1 (20): d, m:f16, qs[16]; d * q_i + m.
- Q5_0 (22): d, qh:u32, qs[16]; q_i gains bit i of qh as its fifth bit; d * (q_i - 16).
  Q5_1 (24): d, m, qh, qs; d * q_i + m. Q8_0 (34): d, qs[32] int8; d * q_i.
- Q2_K (84): scales[16] (scale low nibble, min high), qs[64], d, dmin. Element
  128h + 32j + l is bits 2j.. of qs[32h + l]; sub-blocks of 16; d*sc*q - dmin*m.
- Q3_K (110): hmask[32], qs[64], scales[12] (6-bit, +32), d. Low bits as Q2_K, bit 4h + j of
  hmask[l] adds 4, q - 4; d * (sc - 32) * (q - 4).
- Q4_K (144): d, dmin, scales[12] (eight 6-bit scales and mins), qs[128]: element 64c + l
  is the low nibble of qs[32c + l] (sub-block 2c), 64c + 32 + l its high nibble.
- Q5_K (176): as Q4_K with qh[32] before qs: bit k of qh[l] is the fifth bit of 32k + l.
- IQ4_NL (18): d, qs[16] as Q4_0, weight i = d * K[q_i] with ggml's codebook K of 16 int8
  levels. IQ4_XS (136 per 256): d, scales_h:u16, scales_l[4], qs[128]; group g of 32 has
  qs[16g:16g+16] as IQ4_NL and the 6-bit scale ls_g = (nibble g % 2 of scales_l[g // 2]) |
  (bits 2g.. of scales_h) << 4; weight = d * (ls_g - 32) * K[q].
- MXFP4 (17): e:u8 (E8M0), qs[16] as Q4_0; its body lives in mxfp4.py.
- Q6_K (210): ql[128], qh[64], scales[16] int8, d. Element 128h + 32j + l: low nibble
  (j < 2) or high nibble (j >= 2) of ql[64h + 32(j % 2) + l], bits 2j.. of qh[32h + l]
  on top; q - 32; sub-blocks of 16.

Each dot is one intrinsic that runs the whole row in LLVM IR: per block it unpacks the
quant indices to bytes (64 at a time, in element order so the activations load as they
lie), multiplies them with the activation bytes through simd.dot4 (vpdpbusd, or pmaddubsw
+ pmaddwd; the instruction set of the CPU tier) or, for formats with sub-block scales,
simd.dot4_scaled (pmaddubsw, then pmaddwd/vpdpwssd by the int16 scales: no int32
multiply), and adds the block's int32 sums into float32 vector accumulators that are
summed once per row. Offsets (subtracted biases, k-quant minimums) use
the activation sums ys instead of touching the weights twice:
sum((q - b) * y) = sum(q * y) - b * sum(y).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from runtime.ggml_types import (
    IQ4_NL, IQ4_XS, MXFP4, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, Q8_0_ACTIVATION_TYPES,
    Q8_K_ACTIVATION_TYPES, TYPES_BY_ID,
)

from . import mxfp4
from .simd import _horizontal_sum, byte_lookup, concat, dot4, dot4_scaled, madd16, signed_dot4, signed_dot4_scaled

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


def _v(n, t=_I8):
    return ir.VectorType(t, n)


class _Emit:
    """IR helpers bound to one builder and the f16 -> f32 table."""

    def __init__(self, builder, f16_table):
        self.b = builder
        self.table = f16_table

    def at(self, base, off):
        return self.b.gep(base, [off if isinstance(off, ir.Value) else ir.Constant(_I64, off)])

    def load(self, base, off, ty):
        return self.b.load(self.b.bitcast(self.at(base, off), ty.as_pointer()), align=1)

    def f16(self, base, off):
        """The f16 at byte `off` of base, as float (through the 65,536-entry table)."""
        bits = self.b.zext(self.load(base, off, _I16), _I64)
        return self.b.load(self.b.gep(self.table, [bits]))

    def shr(self, v, k):
        return v if k == 0 else self.b.lshr(v, ir.Constant(v.type, [k] * v.type.count))

    def shl(self, v, k):
        return v if k == 0 else self.b.shl(v, ir.Constant(v.type, [k] * v.type.count))

    def mask(self, v, m):
        return self.b.and_(v, ir.Constant(v.type, [m] * v.type.count))

    def bits(self, v, shift, m):
        return self.mask(self.shr(v, shift), m)

    def cat(self, *parts):
        parts = list(parts)
        while len(parts) > 1:
            parts = [concat(self.b, parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        return parts[0]

    def pick(self, v, lanes):
        """<len(lanes)> of v's lanes."""
        return self.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_v(len(lanes), _I32), lanes))

    def widen(self, v, signed=False):
        t = _v(v.type.count, _I32)
        return self.b.sext(v, t) if signed else self.b.zext(v, t)

    def add(self, a, b):
        return b if a is None else self.b.add(a, b)

    def words_to_lanes(self, words):
        """<4n x i32> of the bytes of the n i32 `words` (zero-extended)."""
        vec = ir.Constant(_v(len(words), _I32), ir.Undefined)
        for i, w in enumerate(words):
            vec = self.b.insert_element(vec, w, ir.Constant(_I32, i))
        return self.widen(self.b.bitcast(vec, _v(4 * len(words))))

    def floats(self, values):
        """<n x float> of the n float values."""
        vec = ir.Constant(_v(len(values), _F32), ir.Undefined)
        for i, value in enumerate(values):
            vec = self.b.insert_element(vec, value, ir.Constant(_I32, i))
        return vec

    def per_block(self, values, lanes):
        """A float vector: each of `values` repeated over `lanes` lanes."""
        return self.pick(self.floats(values), [i for i in range(len(values)) for _ in range(lanes)])

    def block_scales(self, weight_scales, dy):
        """The factor of dot4's sums of k blocks of 32 (8 lanes each): weight scale times
        activation scale, multiplied as one vector (a float for one block)."""
        if len(dy) == 1:
            return self.b.fmul(weight_scales[0], dy[0])
        both = self.b.fmul(self.floats(weight_scales), self.floats(dy))
        return self.pick(both, [i for i in range(len(dy)) for _ in range(8)])

    def bits32_bytes(self, word, value):
        """<32 x i8>: lane i = value if bit i of the i32 `word` is set, else 0."""
        b = self.b
        spread = self.pick(b.bitcast(word, _v(4)), [i // 8 for i in range(32)])
        hit = b.icmp_unsigned("!=", self.b.and_(spread, ir.Constant(_v(32), [1 << (i % 8) for i in range(32)])),
                              ir.Constant(_v(32), None))
        return b.select(hit, ir.Constant(_v(32), [value] * 32), ir.Constant(_v(32), None))

    def sums16(self, ys, count):
        """<count x i32> of the activation sums ys[0:count] (groups of 16)."""
        return self.widen(self.load(ys, 0, _v(count, _I16)), signed=True)

    def at_lane0_of4(self, v):
        """<4n x i32> holding v's lane g at lane 4g and zeros elsewhere."""
        n = v.type.count
        return self.b.shuffle_vector(v, ir.Constant(v.type, None),
                                     ir.Constant(_v(4 * n, _I32), [i // 4 if i % 4 == 0 else n for i in range(4 * n)]))


def _row_dot(block_bytes, y_per_block, step, body, tokens):
    """The codegen of a row dot f(raw, off, nblocks, yq, yd, ys, yblock, ystride, f16_table):
    the dot of the `nblocks` weight blocks at raw[off] with the activations of `tokens`
    vectors, the first from block `yblock` on and each next one `ystride` blocks further; a
    float32, or a tuple of `tokens` float32s. `type_switch` makes the intrinsics.

    body(e, k, blk, y, ys, dy) emits k (= step, or 1 for each block left) blocks at pointer
    blk against activation bytes y, sums ys and scales dy (k floats), and returns terms:
    (int vector, float or float vector) adds int * float, (None, float) adds a float.
    For several tokens the body is emitted once per token; the weight loads and their
    unpacking are the same values each time, and LLVM computes them once (GVN), so a block
    of weights is decoded once for all the tokens (register blocking for matmul).
    """

    def codegen(context, builder, sig, args):
        raw_, off_, nblocks_, yq_, yd_, ys_, yblock_, ystride_, table_ = args

        def data(i):
            return context.make_array(sig.args[i])(context, builder, args[i]).data

        rawp, yqp, ydp, ysp = data(0), data(3), data(4), data(5)
        e = _Emit(builder, data(8))
        accumulators = [{} for _ in range(tokens)]

        def accumulate(terms, slots):
            for ivec, scale in terms:
                if ivec is None:
                    key, value = "scalar", scale
                    t = _F32
                else:
                    t = _v(ivec.type.count, _F32)
                    if not isinstance(scale.type, ir.VectorType):
                        scale = e.per_block([scale], ivec.type.count)
                    value = builder.fmul(builder.sitofp(ivec, t), scale, flags=("fast",))
                    key = ivec.type.count
                if key not in slots:
                    slots[key] = cgutils.alloca_once(builder, t)  # zeroed in the entry block
                slot = slots[key]
                builder.store(builder.fadd(builder.load(slot), value, flags=("fast",)), slot)

        def emit(k, index):
            blk = e.at(rawp, builder.add(off_, builder.mul(index, ir.Constant(_I64, block_bytes))))
            for j in range(tokens):
                first = builder.add(yblock_, builder.mul(ystride_, ir.Constant(_I64, j)))
                yb = builder.add(first, index)
                y = e.at(yqp, builder.mul(yb, ir.Constant(_I64, y_per_block)))
                ysb = e.at(ysp, builder.mul(yb, ir.Constant(_I64, y_per_block // 16)))
                dy = [builder.load(e.at(ydp, builder.add(yb, ir.Constant(_I64, i)))) for i in range(k)]
                accumulate(body(e, k, blk, y, ysb, dy), accumulators[j])

        steps = builder.udiv(nblocks_, ir.Constant(_I64, step))
        with cgutils.for_range(builder, steps) as loop:
            emit(step, builder.mul(loop.index, ir.Constant(_I64, step)))
        if step > 1:  # the blocks left, one at a time
            done = builder.mul(steps, ir.Constant(_I64, step))
            with cgutils.for_range(builder, builder.sub(nblocks_, done)) as loop:
                emit(1, builder.add(done, loop.index))
        totals = []
        for slots in accumulators:
            total = ir.Constant(_F32, 0.0)
            for key, slot in slots.items():
                value = builder.load(slot)
                part = value if key == "scalar" else _horizontal_sum(builder, value)
                total = builder.fadd(total, part, flags=("fast",))
            totals.append(total)
        if tokens == 1:
            return totals[0]
        return context.make_tuple(builder, sig.return_type, totals)

    return codegen


def type_switch(tokens, codegens):
    """An intrinsic f(type_id, raw, off, nblocks, yq, yd, ys, yblock, ystride, f16_table):
    the row dot (`_row_dot`, for `tokens` vectors) of the format `type_id` among
    `codegens` ({type id: codegen}), NaN for any other id. The switch over the ids is
    generated here, so the formats of the integer path are listed once (the ggml_types
    table) and not again as an if-chain per caller."""

    @intrinsic
    def row_dot(typingctx, type_id, raw, off, nblocks, yq, yd, ys, yblock, ystride, table):
        result = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        sig = result(types.int64, raw, types.int64, types.int64, yq, yd, ys, types.int64, types.int64, table)

        def codegen(context, builder, sig, args):
            inner = sig.replace(args=sig.args[1:])
            value_type = context.get_value_type(sig.return_type)
            nan = ir.Constant(_F32, float("nan"))
            slot = cgutils.alloca_once_value(builder, nan if tokens == 1 else ir.Constant(value_type, [nan] * tokens))
            done = builder.append_basic_block("row_dot.done")
            switch = builder.switch(args[0], done)
            for type_id, emit in codegens.items():
                case = builder.append_basic_block(f"row_dot.type{type_id}")
                switch.add_case(ir.Constant(_I64, type_id), case)
                builder.position_at_end(case)
                builder.store(emit(context, builder, inner, args[1:]), slot)
                builder.branch(done)
            builder.position_at_end(done)
            return builder.load(slot)

        return sig, codegen

    return row_dot


# Blocks of 32 per step of the formats with blocks of 32: their scales multiply as vectors.
_LEGACY_STEP = 8


def _formats():
    """{type id: (blocks per step, body)} of every format of the integer path."""
    return {
        Q4_0: (_LEGACY_STEP, _legacy_body(18, 2, bias=8)),
        Q4_1: (_LEGACY_STEP, _legacy_body(20, 4, has_min=True)),
        Q5_0: (_LEGACY_STEP, _legacy_body(22, 6, qh_off=2, bias=16)),
        Q5_1: (_LEGACY_STEP, _legacy_body(24, 8, qh_off=4, has_min=True)),
        Q8_0: (_LEGACY_STEP, _q8_0_body),
        Q2_K: (1, _low2_body(16, None)),
        Q3_K: (1, _low2_body(32, 0)),
        Q4_K: (1, _k4_body(16)),
        Q5_K: (1, _k4_body(48, qh_off=16)),
        Q6_K: (1, _q6_k_body),
        IQ4_NL: (_LEGACY_STEP, _iq4_nl_body),
        IQ4_XS: (1, _iq4_xs_body),
        MXFP4: (2, mxfp4.row_dot_body),
    }


# ------------------------------------------------------------------------ legacy formats

def _nibbles32(e, blk, off):
    """<32 x i8> of the 32 nibbles of the 16 bytes at blk + off, in element order."""
    q = e.load(blk, off, _v(16))
    return e.cat(e.mask(q, 15), e.shr(q, 4))


def _legacy_body(block_bytes, qs_off, qh_off=None, bias=0, has_min=False):
    """Q4_0/Q4_1/Q5_0/Q5_1: 4-bit indices, optional fifth bit, bias or minimum."""

    def body(e, k, blk, y, ys, dy):
        b = e.b
        values = []
        for i in range(k):
            v = _nibbles32(e, blk, block_bytes * i + qs_off)
            if qh_off is not None:
                v = b.or_(v, e.bits32_bytes(e.load(blk, block_bytes * i + qh_off, _I32), 16))
            values.append(v)
        sums = dot4(b, e.cat(*values), e.load(y, 0, _v(32 * k)))
        if bias:
            sums = b.sub(sums, e.shl(e.at_lane0_of4(e.sums16(ys, 2 * k)), bias.bit_length() - 1))
        terms = [(sums, e.block_scales([e.f16(blk, block_bytes * i) for i in range(k)], dy))]
        if has_min:  # m * dy * (sum of the block's activations)
            group = e.sums16(ys, 2 * k)
            ysums = b.add(e.pick(group, list(range(0, 2 * k, 2))), e.pick(group, list(range(1, 2 * k, 2))))
            minima = e.floats([e.f16(blk, block_bytes * i + 2) for i in range(k)])
            terms.append((ysums, b.fmul(minima, e.floats(dy))))
        return terms

    return body


def _q8_0_body(e, k, blk, y, ys, dy):
    b = e.b
    w = e.cat(*[e.load(blk, 34 * i + 2, _v(32)) for i in range(k)])
    sums = signed_dot4(b, w, e.load(y, 0, _v(32 * k)))
    return [(sums, e.block_scales([e.f16(blk, 34 * i) for i in range(k)], dy))]




# ----------------------------------------------------------------------------- k-quants

def _k4_scales_mins(e, blk):
    """Q4_K/Q5_K: (<8 x i32> scales, <8 x i32> mins) from the 12 bytes at blk + 4."""
    b = e.b
    w0, w1, w2 = (e.load(blk, off, _I32) for off in (4, 8, 12))

    def c(v):
        return ir.Constant(_I32, v)

    def hi(low_word, high_word, shift):
        return b.or_(b.and_(b.lshr(high_word, c(shift)), c(0x0F0F0F0F)),
                     b.shl(b.and_(b.lshr(low_word, c(6)), c(0x03030303)), c(4)))

    scales = e.words_to_lanes([b.and_(w0, c(0x3F3F3F3F)), hi(w0, w2, 0)])
    mins = e.words_to_lanes([b.and_(w1, c(0x3F3F3F3F)), hi(w1, w2, 4)])
    return scales, mins


def _k4_body(qs_off, qh_off=None):
    """Q4_K (qh_off None) and Q5_K: eight sub-blocks of 32, 6-bit scales and mins."""

    def body(e, k, blk, y, ys, dy):
        b = e.b
        scales, mins = _k4_scales_mins(e, blk)
        scales = b.trunc(scales, _v(8, _I16))
        high_bits = e.load(blk, qh_off, _v(32)) if qh_off is not None else None
        total = None
        for c in range(4):  # 32 bytes of qs: sub-blocks 2c (low nibbles) and 2c + 1 (high)
            q = e.load(blk, qs_off + 32 * c, _v(32))
            low, high = e.mask(q, 15), e.shr(q, 4)
            if high_bits is not None:  # fifth bit of sub-block s: bit s of qh[l]
                low = b.or_(low, e.shl(e.bits(high_bits, 2 * c, 1), 4))
                high = b.or_(high, e.shl(e.bits(high_bits, 2 * c + 1, 1), 4))
            total = dot4_scaled(b, e.cat(low, high), e.load(y, 64 * c, _v(64)),
                                e.pick(scales, [2 * c] * 8 + [2 * c + 1] * 8), total)
        mins16 = e.pick(b.trunc(mins, _v(8, _I16)), [g // 2 for g in range(16)])
        minimum = madd16(b, e.load(ys, 0, _v(16, _I16)), mins16)  # mins[s] * (ys[2s] + ys[2s + 1])
        return _less_minimum(e, total, minimum, e.f16(blk, 0), e.f16(blk, 2), dy[0])

    return body


def _less_minimum(e, total, minimum, d, dmin, dy):
    """The term d * dy * sum(total) - dmin * dy * sum(minimum), for <16 x i32> total and
    <8 x i32> minimum, as one vector: total's halves added, minimum beside them, one
    conversion and one multiply-add per block and vector instead of two."""
    b = e.b
    folded = b.add(e.pick(total, list(range(8))), e.pick(total, list(range(8, 16))))
    factors = e.per_block([d, b.fneg(dmin)], 8)  # the same for every activation vector
    return [(e.cat(folded, minimum), b.fmul(factors, e.per_block([dy], 16)))]


def _sums_times(e, weights, ys):
    """<8 x i32>: lane g = weights[2g] * ys[2g] + weights[2g+1] * ys[2g+1], for the <16 x i16>
    weights of the 16 sub-blocks of 16 (sum these lanes for sum(weight * activation sum))."""
    return madd16(e.b, weights, e.load(ys, 0, _v(16, _I16)))


def _minus_sums_times(e, total, weights, ys, shift):
    """total (<16 x i32>) less (_sums_times(weights, ys) << shift) in its first 8 lanes: the
    offset of biased indices, taken out once per block as the lanes are summed later."""
    offset = e.shl(_sums_times(e, weights, ys), shift)
    padded = e.b.shuffle_vector(offset, ir.Constant(offset.type, None), ir.Constant(_v(16, _I32), list(range(16))))
    return e.b.sub(total, padded)


def _per16(first_sub):
    """Lanes of a dot4 over 64 elements starting at sub-block first_sub (of 16): 4 each."""
    return [first_sub + g for g in range(4) for _ in range(4)]


def _q6_k_body(e, k, blk, y, ys, dy):
    b = e.b
    scales = b.sext(e.load(blk, 192, _v(16)), _v(16, _I16))
    total = None
    for h in range(2):
        low = e.load(blk, 64 * h, _v(64))
        high = e.load(blk, 128 + 32 * h, _v(32))
        for j2, nib in ((0, e.mask(low, 15)), (2, e.shr(low, 4))):  # elements 128h + 32*j2 + [0:64]
            top = e.mask(e.cat(e.shr(high, 2 * j2), e.shr(high, 2 * j2 + 2)), 3)
            q = b.or_(nib, e.shl(top, 4))
            total = dot4_scaled(b, q, e.load(y, 128 * h + 32 * j2, _v(64)), e.pick(scales, _per16(8 * h + 2 * j2)),
                                total)
    # q - 32: less 32 * sum(scale * ysum)
    return [(_minus_sums_times(e, total, scales, ys, 5), b.fmul(e.f16(blk, 208), dy[0]))]


def _low2_body(qs_off, hmask_off):
    """Q2_K (no hmask) and Q3_K: 2-bit indices in sub-blocks of 16, the hmask's third bit."""

    def body(e, k, blk, y, ys, dy):
        b = e.b
        if hmask_off is None:
            packed = e.load(blk, 0, _v(16))
            scales, mins = (b.zext(v, _v(16, _I16)) for v in (e.mask(packed, 15), e.shr(packed, 4)))
            d = e.f16(blk, 80)
        else:
            w0, w1, w2 = (e.load(blk, 96 + off, _I32) for off in (0, 4, 8))

            def part(word, shift, hshift):
                low = b.and_(b.lshr(word, ir.Constant(_I32, shift)), ir.Constant(_I32, 0x0F0F0F0F))
                top = b.and_(b.lshr(w2, ir.Constant(_I32, hshift)), ir.Constant(_I32, 0x03030303))
                return b.or_(low, b.shl(top, ir.Constant(_I32, 4)))

            stored = e.words_to_lanes([part(w0, 0, 0), part(w1, 0, 2), part(w0, 4, 4), part(w1, 4, 6)])
            scales = b.trunc(b.sub(stored, ir.Constant(_v(16, _I32), [32] * 16)), _v(16, _I16))
            hmask = e.load(blk, hmask_off, _v(32))
            d = e.f16(blk, 108)
        total = None
        for h in range(2):
            qs = e.load(blk, qs_off + 32 * h, _v(32))
            for j2 in (0, 2):  # elements 128h + 32*j2 + [0:64]: j = j2 (first 32) and j2 + 1
                q = e.mask(e.cat(e.shr(qs, 2 * j2), e.shr(qs, 2 * j2 + 2)), 3)
                if hmask_off is not None:
                    hbit = e.mask(e.cat(e.shr(hmask, 4 * h + j2), e.shr(hmask, 4 * h + j2 + 1)), 1)
                    q = b.or_(q, e.shl(hbit, 2))
                total = dot4_scaled(b, q, e.load(y, 128 * h + 32 * j2, _v(64)),
                                    e.pick(scales, _per16(8 * h + 2 * j2)), total)
        scale = b.fmul(d, dy[0])
        if hmask_off is not None:  # q - 4
            return [(_minus_sums_times(e, total, scales, ys, 2), scale)]
        return _less_minimum(e, total, _sums_times(e, mins, ys), d, e.f16(blk, 82), dy[0])

    return body




# ------------------------------------------------------------------------ IQ4_NL, IQ4_XS

IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl


def _iq4_nl_body(e, k, blk, y, ys, dy):
    b = e.b
    w = byte_lookup(b, IQ4_LEVELS, e.cat(*[_nibbles32(e, blk, 18 * i + 2) for i in range(k)]))
    sums = signed_dot4(b, w, e.load(y, 0, _v(32 * k)))
    return [(sums, e.block_scales([e.f16(blk, 18 * i) for i in range(k)], dy))]


def iq4_xs_scales(e, blk):
    """IQ4_XS: the 8 groups' scales ls - 32 as <8 x i32>."""
    b = e.b
    v8 = _v(8, _I32)
    low = e.pick(e.widen(e.load(blk, 4, _v(4))), [g // 2 for g in range(8)])
    low = b.and_(b.lshr(low, ir.Constant(v8, [4 * (g % 2) for g in range(8)])), ir.Constant(v8, [15] * 8))
    high = e.pick(e.widen(b.bitcast(e.load(blk, 2, _I16), _v(2))), [0] * 4 + [1] * 4)
    high = b.and_(b.lshr(high, ir.Constant(v8, [2 * (g % 4) for g in range(8)])), ir.Constant(v8, [3] * 8))
    return b.sub(b.or_(low, b.shl(high, ir.Constant(v8, [4] * 8))), ir.Constant(v8, [32] * 8))


def _iq4_xs_body(e, k, blk, y, ys, dy):
    b = e.b
    scales = b.trunc(iq4_xs_scales(e, blk), _v(8, _I16))
    total = None
    for pair in range(4):  # groups 2p, 2p + 1: 32 bytes of qs, 64 weights
        w = byte_lookup(b, IQ4_LEVELS, e.cat(_nibbles32(e, blk, 8 + 32 * pair), _nibbles32(e, blk, 24 + 32 * pair)))
        total = signed_dot4_scaled(b, w, e.load(y, 64 * pair, _v(64)),
                                   e.pick(scales, [2 * pair] * 8 + [2 * pair + 1] * 8), total)
    return [(total, b.fmul(e.f16(blk, 0), dy[0]))]


# Tokens per call of the blocked row dots (matmul): each block of weights is unpacked once
# for this many activation vectors.
MATMUL_TOKENS = 4
# The formats whose matmul gains from twice as many vectors per unpacked block: Q3_K, Q5_K
# and IQ4_XS, whose unpacking costs more than the accumulators that spill (2048x2048, 96
# vectors, v4-vnni: +10-25%); Q2_K, Q4_K and Q6_K measured equal or slower.
WIDE_TOKENS = 2 * MATMUL_TOKENS
WIDE_TYPES = (Q3_K, Q5_K, IQ4_XS)

# Every format with an integer path (the ggml_types table's `activations`) has a body above;
# each listing below follows from the table.
ROW_DOT_BODIES = _formats()
_INTEGER_TYPES = Q8_0_ACTIVATION_TYPES + Q8_K_ACTIVATION_TYPES
if set(ROW_DOT_BODIES) != set(_INTEGER_TYPES):
    raise ImportError("q8dot.ROW_DOT_BODIES must hold exactly the formats the ggml_types table gives activations")


def _codegens(tokens, type_ids):
    """{type id: row dot codegen} for `tokens` vectors, the block sizes from the table."""
    return {t: _row_dot(TYPES_BY_ID[t].block_bytes, TYPES_BY_ID[t].activations, *ROW_DOT_BODIES[t], tokens)
            for t in type_ids}


ROW_DOT = type_switch(1, _codegens(1, _INTEGER_TYPES))
ROW_DOT_BLOCKED = type_switch(MATMUL_TOKENS, _codegens(MATMUL_TOKENS, _INTEGER_TYPES))
ROW_DOT_WIDE = type_switch(WIDE_TOKENS, _codegens(WIDE_TOKENS, WIDE_TYPES))
