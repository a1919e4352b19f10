"""Blockwise weight quantization in ONNX Runtime's MatMulNBits layout (numpy, no kernels).

Reference layout: onnxruntime's `com.microsoft.MatMulNBits` contrib op (docs/ContribOperators.md)
and its CPU kernel: for `Y = A @ W` with `W [K, N]`, the kernel stores `W^T [N, K]` cut into
`n_blocks = ceil(K / block)` blocks along K, each block `block * bits / 8` bytes:

  B            uint8 [N, n_blocks, block*bits/8]   4-bit: element 2i in the low nibble, 2i+1 high
  scales       float [N * n_blocks]
  zero_points  uint8: 8-bit [N * n_blocks]; 4-bit [N * ceil(n_blocks / 2)], two per byte (low first)
               absent: the kernel uses 2^(bits-1) (8 or 128)

and dequantizes `w = (q - zero_point) * scale`. `GatherBlockQuantized` with uint8 data follows the
same convention, so a tied embedding can read the lm_head's bytes (reshaped to [N, K*bits/8]).

Scale choice: `search=True` tries a range of clip ratios per block and keeps the one with the least
squared error, then refits the scale by least squares for the chosen integers (a cheap stand-in for
GPTQ/HQQ-style error minimization that needs no calibration data). Padding of K up to a block
multiple is zero and dequantizes to exactly 0.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgellama.quant import common

_CLIP_RATIOS = np.linspace(1.0, 0.75, 11)
# Chunks of output columns quantized at once: numpy releases the GIL in the array operations, so
# a second core nearly halves an 8B quantize. Each row (output column) is quantized on its own,
# so the chunking and threads change nothing in the result.
THREADS = min(2, os.cpu_count() or 1)


@dataclasses.dataclass
class Packed:
    data: np.ndarray                 # uint8 [N, n_blocks, blob]
    scales: np.ndarray               # float32 [N, n_blocks]
    zero_points: np.ndarray | None   # uint8 [N, n_blocks] (unpacked); None = symmetric
    bits: int
    block_size: int
    k: int

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.data.shape[1]

    def zero_points_packed(self) -> np.ndarray | None:
        """MatMulNBits' zero_points input (flat)."""
        if self.zero_points is None:
            return None
        if self.bits == 8 or self.zero_points.dtype == np.float32:
            return self.zero_points.reshape(-1)
        return _pack4(self.zero_points).reshape(-1)


def _pack4(q: np.ndarray) -> np.ndarray:
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    return np.clip(np.rint(w * inv[..., None] + zp[..., None]), 0, qmax)


def _refine_affine(w, q, scale, zp, *, qmax: int, integer_zp: bool, rounds: int = 3):
    """Alternate codes and the block's affine map (Lloyd iterations): fit `w ~ s * q + b` by least
    squares for the current codes, re-round, keep whatever lowers the squared error. With integer
    zero points the offset is rounded to the grid (`zp = round(-b / s)`) and s refit for it."""
    def err(q, s, z):
        return np.square((q - z[..., None]) * s[..., None] - w).sum(-1)

    best = err(q, scale, zp)
    n = w.shape[-1]
    for _ in range(rounds):
        sq, sw = q.sum(-1), w.sum(-1)
        sqq, sqw = np.square(q).sum(-1), (q * w).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        s_new = np.divide(n * sqw - sq * sw, det, out=scale.copy(), where=ok).astype(np.float32)
        b_new = np.divide(sw - s_new * sq, n, out=(-zp * scale).astype(np.float32))
        ok &= s_new > 0
        z_new = np.divide(-b_new, s_new, out=zp.copy(), where=ok)
        if integer_zp:
            z_new = np.clip(np.rint(z_new), 0, qmax)
            c = q - z_new[..., None]
            den = np.square(c).sum(-1)
            s_new = np.divide((c * w).sum(-1), den, out=scale.copy(), where=ok & (den > 0)).astype(np.float32)
            ok &= s_new > 0
        s_new = np.where(ok, s_new, scale).astype(np.float32)
        z_new = np.where(ok, z_new, zp).astype(np.float32)
        q_new = _codes(w, s_new, z_new, qmax)
        e = err(q_new, s_new, z_new)
        better = e < best
        if not better.any():
            break
        best = np.where(better, e, best)
        scale = np.where(better, s_new, scale).astype(np.float32)
        zp = np.where(better, z_new, zp).astype(np.float32)
        q = np.where(better[..., None], q_new, q)
    return q, scale, zp


def _quantize_chunk(w: np.ndarray, *, bits: int, symmetric: bool, search: bool, float_zp: bool = False):
    """w [rows, n_blocks, block] float32 -> codes (float), scales, zero points (float)."""
    qmax = (1 << bits) - 1
    mid = float(1 << (bits - 1))
    if symmetric:
        # zero point fixed at 2^(bits-1): codes -mid..mid-1 around it. At 4 bits the block's signed
        # extreme maps to -mid (the scale is negative when that extreme is positive), so all 16
        # codes are used and the step is |extreme| / 8, not / 7 (onnxruntime's own blockwise
        # quantizer does the same); the price, a value of the other sign within half a step of the
        # extreme's magnitude clipping by under one step, is small beside a 1/7 finer step. At 8
        # bits the step gains only 1/127 and that clipping of the largest weights costs more:
        # there the largest magnitude maps to +-(mid-1) and code 0 goes unused (smollm2 int8 mean
        # KL 3.0e-3 that way, 3.4e-3 with the full range; the 4-bit lm_head 0.304 -> 0.286 with it).
        magnitude = np.abs(w)
        if bits <= 4:
            top = np.take_along_axis(w, magnitude.argmax(-1)[..., None], -1)[..., 0] / -mid
        else:
            top = magnitude.max(-1) / (mid - 1)
        ratios = _CLIP_RATIOS if search else np.ones(1)
        zp = np.full(top.shape, mid, np.float32)
        best_err = best_scale = None
        for r in ratios:
            scale = (top * r).astype(np.float32)
            q = _codes(w, scale, zp, qmax)
            err = np.square((q - zp[..., None]) * scale[..., None] - w).sum(-1)
            if best_err is None:
                best_err, best_scale = err, scale
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_scale = np.where(better, scale, best_scale)
        scale = best_scale
    else:
        if float_zp:   # any offset: the grid spans exactly [min, max] (shrunk about its centre)
            lo, hi = w.min(-1), w.max(-1)
        else:          # the integer zero point must be a code: the range must contain 0
            lo, hi = np.minimum(w.min(-1), 0.0), np.maximum(w.max(-1), 0.0)
        ratios = _CLIP_RATIOS if search else np.ones(1)
        best_err = best_scale = best_zp = None
        for r in ratios:
            scale = ((hi - lo) * r / qmax).astype(np.float32)
            inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
            if float_zp:
                zp = (-((hi + lo) / 2 - (hi - lo) * r / 2) * inv).astype(np.float32)
            else:
                zp = np.clip(np.rint(-lo * r * inv), 0, qmax).astype(np.float32)
            q = _codes(w, scale, zp, qmax)
            err = np.square((q - zp[..., None]) * scale[..., None] - w).sum(-1)
            if best_err is None:
                best_err, best_scale, best_zp = err, scale, zp
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_scale = np.where(better, scale, best_scale)
                best_zp = np.where(better, zp, best_zp)
        scale, zp = best_scale, best_zp
    q = _codes(w, scale, zp, qmax)
    if search and not symmetric:
        q, scale, zp = _refine_affine(w, q, scale, zp, qmax=qmax, integer_zp=not float_zp)
    elif search:
        # Least-squares scale for the chosen codes: argmin_s |s (q - zp) - w|^2; keep it only where
        # it really lowers the error (it can move codes' meaning, never their clipping).
        c = q - zp[..., None]
        den = np.square(c).sum(-1)
        ls = np.divide((c * w).sum(-1), den, out=scale.copy(), where=den > 0).astype(np.float32)
        old = np.square(c * scale[..., None] - w).sum(-1)
        new = np.square(c * ls[..., None] - w).sum(-1)
        scale = np.where(new < old, ls, scale).astype(np.float32)
    return q, scale, zp


def quantize(w: np.ndarray | common.Columns, *, bits: int, block_size: int, symmetric: bool = True,
             search: bool = False, float_zero_points: bool = False) -> Packed:
    """Quantize W [K, N] (a MatMul's weight, float32) blockwise along K into MatMulNBits layout.

    `w` may be a `common.Columns` reader: W is then read a chunk of output columns at a time
    (common.CHUNK_BYTES of float32), so a large weight (an 8B lm_head) is never held whole."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if isinstance(w, np.ndarray):
        arr = w
        w = common.Columns(arr.shape[0], arr.shape[1], lambda a, b: arr[:, a:b])
    k, n = w.k, w.n
    n_blocks = -(-k // block_size)
    blob = block_size * bits // 8
    data = np.empty((n, n_blocks, blob), np.uint8)
    scales = np.empty((n, n_blocks), np.float32)
    zps = None if symmetric else np.empty((n, n_blocks), np.float32 if float_zero_points else np.uint8)

    def one(rows: slice) -> None:
        wt = np.zeros((rows.stop - rows.start, n_blocks * block_size), np.float32)
        wt[:, :k] = w.read(rows.start, rows.stop).T
        q, s, zp = _quantize_chunk(wt.reshape(-1, n_blocks, block_size), bits=bits, symmetric=symmetric,
                                   search=search, float_zp=float_zero_points)
        q = q.astype(np.uint8)
        data[rows] = q if bits == 8 else _pack4(q)
        scales[rows] = s
        if zps is not None:
            zps[rows] = zp.astype(zps.dtype)

    chunks = common.column_chunks(n_blocks * block_size, n)
    if THREADS > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(THREADS) as pool:
            for _ in pool.map(one, chunks):
                pass
    else:
        for rows in chunks:
            one(rows)
    return Packed(data, scales, zps, bits, block_size, k)
