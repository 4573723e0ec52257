"""Weight quantization math (numpy): symmetric INT4/INT8, blocked along the input dimension.

A weight W [K, N] used as MatMul(X [.., K], W) is split into blocks of `block` rows; each
block and output column gets one scale, and q = round(W / scale) in [-2^(b-1), 2^(b-1)-1].
When K is not a multiple of the block the last block is shorter (ceil(K / block) scales, as
ONNX's blocked DequantizeLinear defines it), so no weight is left unquantized for its shape.
"""

import numpy as np

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
COLUMNS = 8192  # output columns quantized at a time


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [ceil(K/block), block, N], the short last block padded with zero rows."""
    k, n = x.shape
    pad = -k % block
    if pad:
        x = np.concatenate([x, np.zeros((pad, n), x.dtype)])
    return x.reshape(-1, block, n)


def quantize_blocked(w: np.ndarray, bits: int, block: int, clip: np.ndarray | float = 1.0, scale_dtype=np.float32):
    """w [K, N] -> (q int8 [K, N], scale float32 [ceil(K/block), N]). clip shrinks each block's
    range (scalar, or one per block and column) so outliers cost less resolution. Columns go
    in slices, so the temporaries stay small for any width (an 8B lm_head is 2.5 GB in fp32).
    scale_dtype: the type the scales are stored in; q is rounded against the stored scales."""
    k, n = w.shape
    q = np.empty((k, n), np.int8)
    scale = np.empty((-(-k // block), n), np.float32)
    for c in range(0, n, COLUMNS):
        cols = slice(c, min(c + COLUMNS, n))
        blocks = _blocks(np.asarray(w[:, cols], np.float32), block)
        s = np.abs(blocks).max(axis=1) * (clip[:, cols] if np.ndim(clip) else clip) / qmax(bits)
        s = s.astype(scale_dtype)
        s = np.where(s == 0, 1.0, s).astype(np.float32)
        scale[:, cols] = s
        q[:, cols] = np.clip(np.rint(blocks / s[:, None, :]), -qmax(bits) - 1, qmax(bits)).reshape(-1, blocks.shape[2])[:k]
    return q, scale


def dequantize_blocked(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    k, n = q.shape
    return (_blocks(q, block) * scale[:, None, :]).reshape(-1, n)[:k].astype(np.float32)


def _weighted_error(w, deq, h, block):
    """Per-block output error estimate: sum_k h_k (w - deq)^2, h = E[x_k^2] of the MatMul input."""
    return _blocks(h[:, None] * (w - deq) ** 2, block).sum(axis=1)


def search_clip(w: np.ndarray, h: np.ndarray, bits: int, block: int, scale_dtype=np.float32) -> np.ndarray:
    """Per block and column, the clip ratio from CLIP_GRID with the least activation-weighted error."""
    best_err, best_clip = None, None
    for clip in CLIP_GRID:
        q, scale = quantize_blocked(w, bits, block, clip, scale_dtype)
        err = _weighted_error(w, dequantize_blocked(q, scale, block), h, block)
        if best_err is None:
            best_err, best_clip = err, np.full_like(err, clip)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_clip = np.where(better, clip, best_clip)
    return best_clip.astype(np.float32)


def awq_quantize(w: np.ndarray, h: np.ndarray, mean_abs: np.ndarray, bits: int, block: int, scale_dtype=np.float32):
    """Activation-aware quantization: scale input channel k by s_k = mean|x_k|^alpha before
    quantizing (the MatMul input is divided by s); alpha and each block's clipping are chosen by
    the activation-weighted error (a coarse joint search, then the full clip grid for the best
    alpha). alpha = 0 with no clipping is plain rounding, so this never does worse by that error.
    Returns (q, scale, input_scale s or None when alpha = 0)."""
    # alpha is one number per matrix: judge it on a fixed sample of output columns
    cols = np.random.default_rng(0).choice(w.shape[1], min(w.shape[1], 512), replace=False)
    sample = w[:, cols]
    best = None
    for alpha in ALPHA_GRID:
        s = np.maximum(mean_abs, 1e-6) ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # keep scales centred on 1
        ws, hs = sample * s[:, None], h / s**2  # the error of (x / s) @ (W s), in the scaled space
        q, scale = quantize_blocked(ws, bits, block, search_clip(ws, hs, bits, block, scale_dtype), scale_dtype)
        err = float(_weighted_error(ws, dequantize_blocked(q, scale, block), hs, block).sum())
        if best is None or err < best[0]:
            best = (err, s if alpha else None)
    s = best[1]
    ws, hs = (w * s[:, None], h / s**2) if s is not None else (w, h)
    q, scale = quantize_blocked(ws, bits, block, search_clip(ws, hs, bits, block, scale_dtype), scale_dtype)
    return q, scale, s


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 layout: two values per byte, the first in the low nibble."""
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    low = flat[0::2].astype(np.uint8) & 0x0F
    high = (flat[1::2].astype(np.uint8) & 0x0F) << 4
    return (low | high).tobytes()
