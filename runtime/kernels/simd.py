"""Vector primitives for the block kernels, written as LLVM IR through Numba intrinsics.

Why: Numba fully unrolls a 16- or 32-step loop over one block and LLVM then fails to
re-vectorize it (measured: byte-by-byte `vpinsrb` gathers, ~2.4 G weights/s per core for
Q8_0), while the same work as explicit `<32 x i8>` vector IR runs at ~7.6 G weights/s.
The IR here is generic LLVM (no x86 intrinsics), so every CPU tier compiles it.

Every format stores small integers in bit fields. `bits_dot` and `bits_decode` build one
intrinsic per field recipe (width, masks, layout of B, bias); the shifts are arguments, so
one recipe serves every sub-block of a format (constants fold once inlined): for l in 0..n-1,

    v[l] = ((A[l] >> a_shift) & a_mask) | (((B[l] >> b_shift) & b_mask) << b_lshift)

where A is n bytes at raw[a_off] (or, with a_nibbles, n/2 bytes whose low nibbles are the
first n/2 values and high nibbles the rest: ggml's usual packing) and B, when the recipe
has one, is either n bytes at
raw[b_off] ("bytes") or the 32-bit little-endian word at raw[b_off] whose bit
(b_shift + l) belongs to value l ("bits32"). The dot intrinsic returns
sum((v[l] - ibias) * x[x_off + l]); the decode intrinsic writes
out[out_off + l] = scale * float(v[l] - ibias) + fbias, the operation order ggml uses,
so decoding is bit-exact.

The integer dot products (`dot4`, used by q8dot.py) are the one place with x86 intrinsics:
the instruction set is chosen when a kernel is compiled, from the CPU tier Numba is pinned to
(runtime.cpu), and the kernel cache is kept per tier, so a cached kernel never runs on a CPU
without its instructions.
"""

from functools import lru_cache

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from runtime import cpu

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _element_pointer(context, builder, array_type, array, offset):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [offset])


def _load_vector(builder, pointer, vector_type):
    return builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=1)


def _splat(value, n):
    """A constant <n x i32> with every lane = value."""
    return ir.Constant(ir.VectorType(_I32, n), [value] * n)


def _splat_value(builder, value, vector_type):
    """A vector with every lane = the scalar `value` (of the vector's element type)."""
    n = vector_type.count
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _horizontal_sum(builder, vector):
    """The float32 sum of a <n x float>, in whatever order is fastest (fast-math reduction)."""
    n = vector.type.count
    reduce_add = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F32, [_F32, vector.type]), f"llvm.vector.reduce.fadd.v{n}f32")
    return builder.call(reduce_add, [ir.Constant(_F32, 0.0), vector], fastmath=("fast",))


def _field_values(context, builder, sig, raw, a_off, a_shift, b_off, b_shift, recipe):
    """The <n x float> of v[l] - ibias for one recipe (see the module docstring)."""
    n, a_mask, signed, a_nibbles, b_kind, b_mask, b_lshift, ibias = recipe
    vec_i32 = ir.VectorType(_I32, n)
    a_shift = builder.trunc(a_shift, _I32) if a_shift.type != _I32 else a_shift
    b_shift = builder.trunc(b_shift, _I32) if b_shift.type != _I32 else b_shift
    a_ptr = _element_pointer(context, builder, sig.args[0], raw, a_off)
    if a_nibbles:  # split the bytes into nibbles while still 8-bit wide: 4x less shifting
        vec_i8 = ir.VectorType(_I8, n // 2)
        half = builder.lshr(_load_vector(builder, a_ptr, vec_i8),
                            _splat_value(builder, builder.trunc(a_shift, _I8), vec_i8))
        low = builder.and_(half, ir.Constant(vec_i8, [15] * (n // 2)))
        high = builder.lshr(half, ir.Constant(vec_i8, [4] * (n // 2)))
        both = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        v = builder.zext(both, vec_i32)
    else:
        a = _load_vector(builder, a_ptr, ir.VectorType(_I8, n))
        v = builder.sext(a, vec_i32) if signed else builder.zext(a, vec_i32)
        v = builder.lshr(v, _splat_value(builder, a_shift, vec_i32))
    if a_mask != 0xFF:
        v = builder.and_(v, _splat(a_mask, n))
    if b_kind == "bytes":
        b = _load_vector(builder, _element_pointer(context, builder, sig.args[0], raw, b_off), ir.VectorType(_I8, n))
        b = builder.lshr(builder.zext(b, vec_i32), _splat_value(builder, b_shift, vec_i32))
    elif b_kind == "bits32":
        word_ptr = builder.bitcast(_element_pointer(context, builder, sig.args[0], raw, b_off), _I32.as_pointer())
        word = builder.load(word_ptr, align=1)
        lanes = builder.add(_splat_value(builder, b_shift, vec_i32), ir.Constant(vec_i32, list(range(n))))
        b = builder.lshr(_splat_value(builder, word, vec_i32), lanes)
    if b_kind is not None:
        b = builder.and_(b, _splat(b_mask, n))
        if b_lshift:
            b = builder.shl(b, _splat(b_lshift, n))
        v = builder.or_(v, b)
    if ibias:
        v = builder.sub(v, _splat(ibias, n))
    return builder.sitofp(v, ir.VectorType(_F32, n))


def _recipe(n, a_mask, signed, a_nibbles, b_kind, b_mask, b_lshift, ibias):
    if n not in (16, 32, 64) or b_kind not in (None, "bytes", "bits32") or (b_kind == "bits32" and n > 32):
        raise ValueError(f"unsupported field recipe n={n} b_kind={b_kind}")
    return (n, a_mask, signed, a_nibbles, b_kind, b_mask, b_lshift, ibias)


def bits_dot(n, a_mask=0xFF, signed=False, a_nibbles=False, b_kind=None, b_mask=0, b_lshift=0, ibias=0):
    """An intrinsic f(raw, a_off, a_shift, b_off, b_shift, x, x_off) -> float32
    = sum((v - ibias) * x[x_off:x_off+n])."""
    recipe = _recipe(n, a_mask, signed, a_nibbles, b_kind, b_mask, b_lshift, ibias)

    @intrinsic
    def dot(typingctx, raw, a_off, a_shift, b_off, b_shift, x, x_off):
        sig = types.float32(raw, a_off, types.int32, b_off, types.int32, x, x_off)

        def codegen(context, builder, sig, args):
            raw_, a_off_, a_shift_, b_off_, b_shift_, x_, x_off_ = args
            values = _field_values(context, builder, sig, raw_, a_off_, a_shift_, b_off_, b_shift_, recipe)
            xs = _load_vector(builder, _element_pointer(context, builder, sig.args[5], x_, x_off_),
                              ir.VectorType(_F32, n))
            return _horizontal_sum(builder, builder.fmul(values, xs, flags=("fast",)))

        return sig, codegen

    return dot


def bits_decode(n, a_mask=0xFF, signed=False, a_nibbles=False, b_kind=None, b_mask=0, b_lshift=0, ibias=0):
    """An intrinsic f(raw, a_off, a_shift, b_off, b_shift, scale, fbias, out, out_off)
    writing out[out_off:out_off+n] = scale * (v - ibias) + fbias."""
    recipe = _recipe(n, a_mask, signed, a_nibbles, b_kind, b_mask, b_lshift, ibias)

    @intrinsic
    def decode(typingctx, raw, a_off, a_shift, b_off, b_shift, scale, fbias, out, out_off):
        sig = types.void(raw, a_off, types.int32, b_off, types.int32, types.float32, types.float32, out, out_off)

        def codegen(context, builder, sig, args):
            raw_, a_off_, a_shift_, b_off_, b_shift_, scale_, fbias_, out_, out_off_ = args
            values = _field_values(context, builder, sig, raw_, a_off_, a_shift_, b_off_, b_shift_, recipe)
            vec_f32 = ir.VectorType(_F32, n)
            scaled = builder.fmul(_splat_value(builder, scale_, vec_f32), values)
            result = builder.fadd(scaled, _splat_value(builder, fbias_, vec_f32))
            target = builder.bitcast(_element_pointer(context, builder, sig.args[7], out_, out_off_),
                                     vec_f32.as_pointer())
            builder.store(result, target, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return decode


def _sum_intrinsic(n):
    @intrinsic
    def vector_sum(typingctx, x, x_off):
        sig = types.float32(x, x_off)

        def codegen(context, builder, sig, args):
            xs = _load_vector(builder, _element_pointer(context, builder, sig.args[0], args[0], args[1]),
                              ir.VectorType(_F32, n))
            return _horizontal_sum(builder, xs)

        return sig, codegen

    return vector_sum


sum16 = _sum_intrinsic(16)  # sum(x[x_off:x_off+16])
sum32 = _sum_intrinsic(32)  # sum(x[x_off:x_off+32])


# ------------------------------------------------------------------ integer dot products

_I16 = ir.IntType(16)


@lru_cache(maxsize=None)
def integer_isa() -> str:
    """The instruction set the integer dot products are compiled for, from the pinned tier:
    vnni512 (AVX512-VNNI), avx512 (AVX-512BW), vnni256 (AVX-VNNI), avx2, ssse3, or generic
    (plain LLVM vector IR, for x86-64 and other architectures)."""
    features = cpu.compiled_features()
    if {"avx512vnni", "avx512bw", "avx512vl"} <= features:
        return "vnni512"
    if {"avx512bw", "avx512vl"} <= features:
        return "avx512"
    if "avxvnni" in features and "avx2" in features:
        return "vnni256"
    if "avx2" in features:
        return "avx2"
    if "ssse3" in features:
        return "ssse3"
    return "generic"


_WIDEST = {"vnni512": 64, "avx512": 64, "vnni256": 32, "avx2": 32, "ssse3": 16}


def _declare(builder, name, result, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, args), name)


def _slice(builder, vector, start, n):
    return builder.shuffle_vector(vector, ir.Constant(vector.type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, n), list(range(start, start + n))))


def concat(builder, a, b):
    """The vector a followed by b (same type)."""
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))


def _dot4_native(builder, isa, u, s):
    """dot4 of one register's width (16, 32 or 64 bytes) with the tier's instructions."""
    n = u.type.count
    v32 = ir.VectorType(_I32, n // 4)
    if isa.startswith("vnni"):
        f = _declare(builder, f"llvm.x86.avx512.vpdpbusd.{8 * n}", v32, [v32, v32, v32])
        return builder.call(f, [ir.Constant(v32, None), builder.bitcast(u, v32), builder.bitcast(s, v32)])
    v16 = ir.VectorType(_I16, n // 2)
    v8 = u.type
    names = {16: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"),
             32: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
             64: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")}[n]
    pairs = builder.call(_declare(builder, names[0], v16, [v8, v8]), [u, s])
    return builder.call(_declare(builder, names[1], v32, [v16, v16]), [pairs, ir.Constant(v16, [1] * (n // 2))])


def _dot4_generic(builder, u, s):
    n = u.type.count
    v32 = ir.VectorType(_I32, n)
    products = builder.mul(builder.zext(u, v32), builder.sext(s, v32))
    quarter = ir.VectorType(_I32, n // 4)
    lanes = [builder.shuffle_vector(products, ir.Constant(v32, ir.Undefined),
                                    ir.Constant(quarter, list(range(k, n, 4)))) for k in range(4)]
    return builder.add(builder.add(lanes[0], lanes[1]), builder.add(lanes[2], lanes[3]))


def dot4(builder, u, s):
    """<n/4 x i32> whose lane k is sum(u[4k+i] * s[4k+i], i < 4) for <n x i8> u (unsigned)
    and s (signed), n in 16, 32, 64.

    Exact as long as u <= 128 and s >= -127 (pmaddubsw saturates its pair sums to int16:
    2 * 128 * 127 fits). AVX512-VNNI/AVX-VNNI: vpdpbusd; AVX-512BW/AVX2/SSSE3: pmaddubsw,
    then pmaddwd by ones; otherwise plain widening multiplies and adds.
    """
    isa = integer_isa()
    widest = _WIDEST.get(isa)
    if widest is None:
        return _dot4_generic(builder, u, s)
    n = u.type.count
    if n <= widest:
        return _dot4_native(builder, isa, u, s)
    parts = [_dot4_native(builder, isa, _slice(builder, u, k, widest), _slice(builder, s, k, widest))
             for k in range(0, n, widest)]
    while len(parts) > 1:
        parts = [concat(builder, parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def dot4_acc(builder, acc, u, s):
    """acc + dot4(u, s): one vpdpbusd on the VNNI tiers (it adds into acc), else dot4 and an
    add. acc <n/4 x i32>, u and s <n x i8> as dot4's."""
    isa = integer_isa()
    n = u.type.count
    if isa.startswith("vnni") and n == _WIDEST[isa]:
        v32 = ir.VectorType(_I32, n // 4)
        f = _declare(builder, f"llvm.x86.avx512.vpdpbusd.{8 * n}", v32, [v32, v32, v32])
        return builder.call(f, [acc, builder.bitcast(u, v32), builder.bitcast(s, v32)])
    return builder.add(acc, dot4(builder, u, s))


_MADD_WD = {16: "llvm.x86.sse2.pmadd.wd", 32: "llvm.x86.avx2.pmadd.wd", 64: "llvm.x86.avx512.pmaddw.d.512"}
_MADD_UB = {16: "llvm.x86.ssse3.pmadd.ub.sw.128", 32: "llvm.x86.avx2.pmadd.ub.sw", 64: "llvm.x86.avx512.pmaddubs.w.512"}


def _madd16_native(builder, isa, a, b, acc):
    """acc + pmaddwd(a, b) for <n x i16> a, b of one register (vpdpwssd on the VNNI tiers)."""
    n = a.type.count
    v32 = ir.VectorType(_I32, n // 2)
    if isa.startswith("vnni"):
        f = _declare(builder, f"llvm.x86.avx512.vpdpwssd.{16 * n}", v32, [v32, v32, v32])
        start = acc if acc is not None else ir.Constant(v32, None)
        return builder.call(f, [start, builder.bitcast(a, v32), builder.bitcast(b, v32)])
    pairs = builder.call(_declare(builder, _MADD_WD[2 * n], v32, [a.type, a.type]), [a, b])
    return pairs if acc is None else builder.add(acc, pairs)


def madd16(builder, a, b):
    """<n/2 x i32> whose lane k is a[2k] * b[2k] + a[2k+1] * b[2k+1], for <n x i16> a and b
    (pmaddwd; n in 8, 16, 32)."""
    n = a.type.count
    isa = integer_isa()
    widest = _WIDEST.get(isa)
    if widest is None:
        v32 = ir.VectorType(_I32, n)
        products = builder.mul(builder.sext(a, v32), builder.sext(b, v32))
        half = ir.VectorType(_I32, n // 2)
        even, odd = (builder.shuffle_vector(products, ir.Constant(v32, ir.Undefined),
                                            ir.Constant(half, list(range(j, n, 2)))) for j in (0, 1))
        return builder.add(even, odd)
    width = min(widest // 2, n)  # int16 lanes per register
    parts = []
    for k in range(0, n, width):
        ak = _slice(builder, a, k, width) if width < n else a
        bk = _slice(builder, b, k, width) if width < n else b
        f = _declare(builder, _MADD_WD[2 * width], ir.VectorType(_I32, width // 2), [ak.type, ak.type])
        parts.append(builder.call(f, [ak, bk]))
    while len(parts) > 1:
        parts = [concat(builder, parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def dot4_scaled(builder, u, s, scale, acc=None):
    """acc + <n/4 x i32> whose lane k is scale[k] * sum(u[4k+i] * s[4k+i], i < 4), for <n x i8>
    u (unsigned), s (signed) and <n/4 x i16> scale; n in 16, 32, 64.

    The sub-block scales of the k-quants applied inside the integer sums, as ggml does:
    pmaddubsw pairs the bytes into int16, then pmaddwd (vpdpwssd with VNNI, which adds into
    acc too) multiplies each pair sum by its scale: two instructions per register, where
    dot4 and an int32 multiply take three or more. Exact while every pair sum
    u[2j] s[2j] + u[2j+1] s[2j+1] fits int16 (pmaddubsw saturates): u <= 128 and s >= -127
    suffice, and the scaled sums fit int32.
    """
    n = u.type.count
    scale16 = builder.shuffle_vector(scale, ir.Constant(scale.type, ir.Undefined),
                                     ir.Constant(ir.VectorType(_I32, n // 2), [k // 2 for k in range(n // 2)]))
    isa = integer_isa()
    widest = _WIDEST.get(isa)
    if widest is None:
        sums = builder.mul(_dot4_generic(builder, u, s), builder.sext(scale, ir.VectorType(_I32, n // 4)))
        return sums if acc is None else builder.add(acc, sums)
    width = min(widest, n)
    parts = []
    for k in range(0, n, width):
        uk = _slice(builder, u, k, width) if width < n else u
        sk = _slice(builder, s, k, width) if width < n else s
        pairs = builder.call(_declare(builder, _MADD_UB[width], ir.VectorType(_I16, width // 2), [uk.type, uk.type]),
                             [uk, sk])
        sc = _slice(builder, scale16, k // 2, width // 2) if width < n else scale16
        ak = None if acc is None else (_slice(builder, acc, k // 4, width // 4) if width < n else acc)
        parts.append(_madd16_native(builder, isa, pairs, sc, ak))
    while len(parts) > 1:
        parts = [concat(builder, parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def signed_dot4_scaled(builder, w, s, scale, acc=None):
    """dot4_scaled for signed w (-128..127), by the sign trick of signed_dot4."""
    return dot4_scaled(builder, *_sign_moved(builder, w, s), scale, acc)


def _sign_moved(builder, w, s):
    """(|w|, s with w's sign): the same products, with the first factor unsigned."""
    zero = ir.Constant(w.type, None)
    negative = builder.icmp_signed("<", w, zero)
    return builder.select(negative, builder.sub(zero, w), w), builder.select(negative, builder.sub(zero, s), s)


def signed_dot4(builder, w, s):
    """dot4 for signed w (-128..127): |w| times s with w's sign (ggml's sign trick)."""
    return dot4(builder, *_sign_moved(builder, w, s))


def byte_lookup(builder, table, indices):
    """<n x i8> of table[indices[i]] for a constant table of 16 bytes and indices 0..15:
    pshufb (SSSE3/AVX2/AVX-512BW) with the table in every 128-bit lane, or a tree of 15
    selects on the index bits in plain IR."""
    n = indices.type.count
    isa = integer_isa()
    widest = _WIDEST.get(isa)
    if widest is None:
        level = [ir.Constant(_v8(n), [value & 0xFF] * n) for value in table]
        for bit in range(4):
            chosen = builder.icmp_unsigned("!=", builder.and_(indices, ir.Constant(_v8(n), [1 << bit] * n)),
                                           ir.Constant(_v8(n), None))
            level = [builder.select(chosen, level[i + 1], level[i]) for i in range(0, len(level), 2)]
        return level[0]
    names = {16: "llvm.x86.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}
    width = min(widest, n)
    f = _declare(builder, names[width], _v8(width), [_v8(width), _v8(width)])
    lanes = ir.Constant(_v8(width), [table[i % 16] & 0xFF for i in range(width)])
    parts = [builder.call(f, [lanes, _slice(builder, indices, k, width) if width < n else indices])
             for k in range(0, n, width)]
    while len(parts) > 1:
        parts = [concat(builder, parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def _v8(n):
    return ir.VectorType(_I8, n)


def has_f16c() -> bool:
    """Whether the pinned tier converts f16 in hardware (F16C: x86-64-v3 and up)."""
    return "f16c" in cpu.compiled_features()


_F16_LANES = 16


@intrinsic
def f16_to_f32_f16c(typingctx, raw, out):
    """out[i] = the IEEE binary16 value of the 2 bytes raw[2i:2i+2] (little-endian), for i <
    out.size: LLVM's `fpext half to float`, 16 values an instruction (vcvtph2ps). Exact
    (every f16 is a float32). Only for tiers with F16C (has_f16c): elsewhere LLVM would
    call a runtime helper per value."""
    sig = types.void(raw, out)

    def codegen(context, builder, sig, args):
        raw_, out_ = args
        src = context.make_array(sig.args[0])(context, builder, raw_).data
        dst_array = context.make_array(sig.args[1])(context, builder, out_)
        dst = dst_array.data
        n = builder.extract_value(dst_array.shape, 0)
        half, half_vec = ir.HalfType(), ir.VectorType(ir.HalfType(), _F16_LANES)
        float_vec = ir.VectorType(_F32, _F16_LANES)
        src_half = builder.bitcast(src, half.as_pointer())
        lanes = ir.Constant(n.type, _F16_LANES)
        chunks = builder.udiv(n, lanes)
        with cgutils.for_range(builder, chunks) as loop:
            first = builder.mul(loop.index, lanes)
            values = builder.load(builder.bitcast(builder.gep(src_half, [first]), half_vec.as_pointer()), align=1)
            builder.store(builder.fpext(values, float_vec),
                          builder.bitcast(builder.gep(dst, [first]), float_vec.as_pointer()), align=4)
        done = builder.mul(chunks, lanes)
        with cgutils.for_range(builder, builder.sub(n, done)) as loop:
            i = builder.add(done, loop.index)
            builder.store(builder.fpext(builder.load(builder.gep(src_half, [i]), align=1), _F32),
                          builder.gep(dst, [i]))
        return context.get_dummy_value()

    return sig, codegen
