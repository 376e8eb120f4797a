"""GGUF quantized blocks as MatMulNBits blocks: the arithmetic of transcoding (transcoding.py does the graph).

MatMulNBits (onnxruntime com.microsoft, 1.32) computes with W[n, k] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]:
q unsigned `bits`-bit integers packed along K (low nibble first for 4 bits), one scale per block of `bs` weights,
and a zero point that is either an integer (packed like q; default 2^(bits-1) when absent) or a float of the scales'
type. Each GGUF type this module carries is that formula with its own values:

  Q4_0  w = d*(q-8)                  -> 4 bits, block 32, scale d, zero point 8 (the default): exact
  Q8_0  w = d*x, x int8              -> 8 bits, block 32, q = x+128, zero point 128 (the default): exact
  Q4_1  w = d*q + m                  -> 4 bits, block 32, scale d, float zero point -m/d: to float rounding
  Q4_K  w = (d*sc_j)*q - dmin*m_j    -> 4 bits, block 32 (one per 32-weight sub-block j), scale d*sc_j,
                                        float zero point dmin*m_j/(d*sc_j): to float rounding
  Q6_K  w = (d*sc_j)*(q-32), q 6 bit -> 8 bits, block 16, scale d*sc_j, zero point 32: exact

A block whose scale is 0 is constant c: it becomes q=0, scale -c, zero point 1 (float zero points only).
Q5_0/Q5_1/Q5_K (5-bit values) would need 8-bit storage, bigger than the GGUF, and the other K-quants and IQ types
have no per-block affine form, so they are not carried.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

CARRIED = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")
QK_K = 256
TYPE_SIZES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class NBits:
    """One weight matrix [N, K] in MatMulNBits terms (unpacked). zero_points: None means the op's default."""

    bits: int
    block_size: int
    q: U8  # [N, K], values < 2**bits
    scales: F32  # [N, K // block_size]
    zero_points: npt.NDArray[np.float32] | npt.NDArray[np.uint8] | None  # [N, K // block_size]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    def layout(self) -> tuple[int, int, str]:
        """What must agree for two matrices to share one MatMulNBits node (bits, block, zero point kind)."""
        kind = "none" if self.zero_points is None else str(self.zero_points.dtype)
        return self.bits, self.block_size, kind


def _f16(raw: U8) -> F32:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32).reshape(raw.shape[0], -1)


def _nibbles(qs: U8, width: int) -> U8:
    """GGUF's 4-bit layout: byte j holds element j (low nibble) and element j + width/2 (high nibble)."""
    n = qs.shape[0]
    halves = qs.reshape(n, -1, 1, width // 2) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (halves & np.uint8(0x0F)).reshape(n, -1)


def _affine(q: U8, scale: F32, offset: F32, bits: int, block_size: int) -> NBits:
    """w = scale*q + offset per block, as (q - zp)*scale with a float zero point; constant blocks as q=0."""
    n_blocks = scale.size
    q = q.reshape(n_blocks, block_size).copy()
    scale = scale.reshape(n_blocks).astype(np.float32)
    offset = offset.reshape(n_blocks).astype(np.float32)
    flat = scale == 0
    safe = np.where(flat, np.float32(1), scale)
    zp = np.where(flat, np.float32(1), -offset / safe).astype(np.float32)
    scale = np.where(flat, -offset, scale).astype(np.float32)
    q[flat] = 0
    return NBits(bits, block_size, q, scale, zp)


def decode(raw: U8, qtype: str) -> NBits:
    """A GGUF tensor's raw bytes [N, bytes per row] of type `qtype` (one of CARRIED) as MatMulNBits blocks."""
    if qtype not in TYPE_SIZES:
        raise ValueError(f"{qtype} blocks cannot be carried into MatMulNBits")
    block, size = TYPE_SIZES[qtype]
    rows = raw.shape[0]
    if raw.shape[1] % size:
        raise ValueError(f"{qtype}: {raw.shape[1]} bytes per row is not a whole number of {size}-byte blocks")
    k = raw.shape[1] // size * block
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    if qtype == "Q4_0":
        d = _f16(blocks[:, :2])
        q = _nibbles(blocks[:, 2:], 32)
        result = NBits(4, 32, q, d, None)
    elif qtype == "Q8_0":
        d = _f16(blocks[:, :2])
        q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        result = NBits(8, 32, q, d, None)
    elif qtype == "Q4_1":
        d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        result = _affine(_nibbles(blocks[:, 4:], 32), d, m, 4, 32)
    elif qtype == "Q4_K":
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mins = q4k_scale_min(blocks[:, 4:16])
        scale = d * sc.astype(np.float32)  # [n, 8], as gguf-py computes it
        offset = -(dmin * mins.astype(np.float32))
        q = _nibbles(blocks[:, 16:], 64)  # 4 chunks of 32 bytes: low nibbles sub-block 2c, high 2c+1
        result = _affine(q, scale, offset, 4, 32)
    else:  # Q6_K
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])
        n = blocks.shape[0]
        low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(
            0x0F
        )
        high = (
            qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        ) & np.uint8(3)
        q = low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << np.uint8(4))
        zp = np.full((n, QK_K // 16), 32, dtype=np.uint8)
        result = NBits(8, 16, q.reshape(n, QK_K), d * sc, zp)
    kb = k // result.block_size
    zero_points = None if result.zero_points is None else result.zero_points.reshape(rows, kb)
    return NBits(
        result.bits,
        result.block_size,
        result.q.reshape(rows, k),
        result.scales.reshape(rows, kb).astype(np.float32),
        zero_points,
    )


def q4k_scale_min(scales: U8) -> tuple[U8, U8]:
    """The 8 six-bit scales and 8 six-bit mins packed in Q4_K's 12 bytes (as gguf-py's Q4_K.get_scale_min)."""
    n = scales.shape[0]
    s = np.ascontiguousarray(scales, dtype=np.uint8).reshape(n, 3, 4)
    d, m, m_d = s[:, 0, :], s[:, 1, :], s[:, 2, :]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.uint8), mn.astype(np.uint8)


def dequantize(w: NBits) -> F32:
    """W[N, K] as MatMulNBits computes it: (q - zp) * scale, in float32."""
    n, k = w.shape
    kb = k // w.block_size
    q = w.q.reshape(n, kb, w.block_size).astype(np.float32)
    default = float(2 ** (w.bits - 1))
    zp = np.float32(default) if w.zero_points is None else w.zero_points.astype(np.float32)[..., None]
    return ((q - zp) * w.scales[..., None]).reshape(n, k).astype(np.float32)


def pack_b(w: NBits) -> U8:
    """MatMulNBits input B: uint8 [N, K/bs, bs*bits/8], 4-bit pairs low nibble first."""
    n, k = w.shape
    kb = k // w.block_size
    if w.bits == 8:
        return w.q.reshape(n, kb, w.block_size).astype(np.uint8)
    pairs = w.q.reshape(n, kb, w.block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << np.uint8(4))).astype(np.uint8)


def pack_zero_points(w: NBits) -> npt.NDArray[np.float32] | U8 | None:
    """MatMulNBits input zero_points: float [N, K/bs] as is; integer 8-bit [N, K/bs]; 4-bit [N, ceil(K/bs/2)]."""
    zp = w.zero_points
    if zp is None or zp.dtype != np.uint8 or w.bits == 8:
        return zp
    n, kb = zp.shape
    padded = np.zeros((n, kb + kb % 2), dtype=np.uint8)
    padded[:, :kb] = zp
    packed: U8 = (padded[:, 0::2] | (padded[:, 1::2] << np.uint8(4))).astype(np.uint8)
    return packed


def min_form(w: NBits) -> tuple[NBits, F32]:
    """A float-zero-point matrix as integer blocks at the default zero point z = 2^(bits-1) plus per-block mins:
    W = (q - zp)*s = (q - z)*s + m' with m' = (z - zp)*s, and m' = mins + z*s for mins = -zp*s (Q4_1's own m, up to
    float rounding: `mins` snaps to float16 where it is within 2 float32 ulps of it, so a GGUF's f16 m comes back
    bit for bit). Returns (the integer-zero-point matrix, mins [N, K/bs]); MatMulNBits then takes its fast path
    (integer zero points) and x @ W^T = MatMulNBits(x) + blocksum(x) @ (mins + z*s)^T."""
    if w.zero_points is None or w.zero_points.dtype == np.uint8:
        raise ValueError("min_form needs float zero points")
    mins = (-w.zero_points.astype(np.float32) * w.scales).astype(np.float32)
    snapped = mins.astype(np.float16).astype(np.float32)
    close = np.abs(snapped - mins) <= 2 * np.finfo(np.float32).eps * np.abs(mins)
    mins = np.where(close, snapped, mins).astype(np.float32)
    return NBits(w.bits, w.block_size, w.q, w.scales, None), mins


def take_rows(w: NBits, order: npt.NDArray[np.intp]) -> NBits:
    """W's output rows reordered (row i of the result is row order[i]); blocks run along K, so they stay whole."""
    zp = None if w.zero_points is None else w.zero_points[order]
    return NBits(w.bits, w.block_size, w.q[order], w.scales[order], zp)


def concat_rows(parts: list[NBits]) -> NBits:
    """Matrices of one layout stacked along N (a fused q|k|v projection)."""
    first = parts[0]
    zps = [p.zero_points for p in parts]
    zp = None if first.zero_points is None else np.concatenate([z for z in zps if z is not None])
    q = np.concatenate([p.q for p in parts])
    scales = np.concatenate([p.scales for p in parts])
    return NBits(first.bits, first.block_size, q, scales, zp)


def llama_unpermute(rows: int, heads: int) -> npt.NDArray[np.intp]:
    """Row order that undoes llama.cpp's rotary permutation of q_proj/k_proj (convert_hf_to_gguf `permute`)."""
    permuted = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    return np.argsort(permuted).astype(np.intp)
