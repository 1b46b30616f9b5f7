"""Seeded patch masking of images for PAPO's masked-image branch.

Two methods (docs/papo.md, "The masked image"):

- ``reference`` (:func:`mask_raw_image`, :func:`mask_raw_images`): on the raw uint8 HxWxC image,
  before any resize, walk a ``patch_size`` grid of pixel cells (row-major, edge cells partial) and
  set each cell to ``fill`` in every channel with probability ``ratio``. This is what the PAPO
  reference code does (there with an unseeded global RNG).
- ``patch_aligned`` (:func:`mask_pixel_value_rows`): on the processed Qwen2.5-VL ``pixel_values``,
  the mask unit is one row (one 14x14 ViT patch of the resized image, 3 x 2 x 14 x 14 values,
  channel slowest); a masked row is overwritten with the normalised fill (one value per channel
  block). Rows are in merge-window order; the cell of row ``r`` is its patch (t, py, px) in the grid.

Determinism: the mask is a pure function of (seed, sample_id, image_index, cell), where cell is
``(t * gh + cy) * gw + cx`` on the image's cell grid (gh x gw cells). Per image,
``key = absorb(absorb(absorb(0, seed), sample_id), image_index)`` with
``absorb(h, v) = splitmix64_mix((h ^ v) + GOLDEN)``; cell c draws ``d = splitmix64_mix(key + (c+1) * GOLDEN)``
(output c of a SplitMix64 stream seeded with key). Bernoulli mode masks the cell iff
``(d >> 11) < ceil(ratio * 2**53)``, i.e. ``u < ratio`` for ``u = (d >> 11) / 2**53``, exact in integers.
``exact_ratio`` masks the ``floor(ratio * n + 0.5)`` cells with the smallest ``(d, c)``.
Because raw cells and patch rows share this cell index, masking an unresized raw image whose sides
are multiples of 28 and then running the processor equals patch-aligned masking of its rows.

The C++ extension ``megatron_papo._patch_mask`` and the numpy code here give bitwise-equal output;
the numpy code is used (with one warning per process) when the extension is not built.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@functools.cache
def _extension():
    try:
        from megatron_papo import _patch_mask
    except ImportError as e:
        warnings.warn(
            f"megatron_papo._patch_mask is not built ({e}); patch masking uses the slower, "
            "bitwise-identical numpy fallback. Build it with `python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _patch_mask


def extension_available() -> bool:
    """True when the C++ extension is used (else the numpy fallback, after one warning)."""
    return _extension() is not None


# ---------------------------------------------------------------- the RNG (numpy twin of C++)
def _mix64(z):
    """SplitMix64 finaliser on a Python int or a uint64 array (arrays wrap mod 2**64)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def image_key(seed: int, sample_id: int, image_index: int) -> int:
    """The per-image RNG key (a uint64 as a Python int)."""
    h = 0
    for v in (seed, sample_id, image_index):
        h = _mix64(((h ^ v) + _GOLDEN) & _MASK64)
    return h


def _cell_mask_numpy(key: int, n_cells: int, ratio: float, exact: bool) -> np.ndarray:
    cells = np.arange(1, n_cells + 1, dtype=np.uint64)
    draws = _mix64(np.uint64(key) + cells * np.uint64(_GOLDEN))
    if not exact:
        return (draws >> np.uint64(11)) < np.uint64(math.ceil(ratio * 2.0**53))
    k = math.floor(ratio * n_cells + 0.5)
    mask = np.zeros(n_cells, dtype=bool)
    mask[np.argsort(draws, kind="stable")[:k]] = True  # stable: ties go to the lower cell
    return mask


# ---------------------------------------------------------------- argument checks
def _check_uint64(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= int(value) <= _MASK64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return int(value)


def _check_ids(name: str, values, n: int) -> list[int]:
    if values is None and name == "image_indices":
        return [0] * n
    if not isinstance(values, (list, tuple, np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a list of ints, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per image ({n}), got {len(values)}")
    return [_check_uint64(f"{name}[{i}]", int(v) if isinstance(v, torch.Tensor) else v)
            for i, v in enumerate(values)]


def _check_ratio(ratio) -> float:
    if not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


def cell_mask(grid_h: int, grid_w: int, *, seed: int, sample_id: int, image_index: int = 0,
              ratio: float = 0.6, exact_ratio: bool = False) -> np.ndarray:
    """Boolean [grid_h, grid_w] mask of one image's cells (True = masked). For a grid (t, gh, gw)
    of pixel_values rows, ``cell_mask(t * gh, gw, ...)`` gives the mask of patch (tt, py, px) at
    ``[tt * gh + py, px]``."""
    if grid_h < 0 or grid_w < 0:
        raise ValueError(f"grid_h and grid_w must be >= 0, got {grid_h}, {grid_w}")
    seed = _check_uint64("seed", seed)
    sample_id = _check_uint64("sample_id", sample_id)
    image_index = _check_uint64("image_index", image_index)
    ratio = _check_ratio(ratio)
    ext = _extension()
    if ext is not None:
        flat = ext.cell_mask(seed, sample_id, image_index, grid_h * grid_w, ratio, exact_ratio)
    else:
        flat = _cell_mask_numpy(image_key(seed, sample_id, image_index), grid_h * grid_w, ratio,
                                exact_ratio)
    return flat.reshape(grid_h, grid_w)


# ---------------------------------------------------------------- reference: raw images
def mask_raw_images(images: Sequence[np.ndarray], *, seed: int, sample_ids: Sequence[int],
                    image_indices: Sequence[int] | None = None, ratio: float = 0.6,
                    patch_size: int = 14, fill: int = 0, exact_ratio: bool = False,
                    out: Sequence[np.ndarray] | None = None,
                    backend: str | None = None) -> list[np.ndarray]:
    """Masked copies of uint8 HxWxC images (reference method), one C++ call for the batch.

    The outputs are fresh arrays, one per image, from numpy's allocator (which reuses memory freed
    by earlier batches: one new batch-sized buffer instead costs a page fault per page, measured
    slower than the masking itself). ``out``: caller-owned destination arrays (same shapes, uint8,
    not overlapping the inputs), filled and returned.

    ``backend``: None (the extension if built), "cpp" or "numpy" (for tests and benchmarks).
    """
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of HxWxC uint8 arrays, got {type(images).__name__}")
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8:
            raise TypeError(f"images[{i}] must be a uint8 numpy array, got "
                            f"{getattr(im, 'dtype', type(im).__name__)}")
        if im.ndim != 3:
            raise ValueError(f"images[{i}] must be HxWxC, got shape {im.shape}")
    seed = _check_uint64("seed", seed)
    sample_ids = _check_ids("sample_ids", sample_ids, len(images))
    image_indices = _check_ids("image_indices", image_indices, len(images))
    ratio = _check_ratio(ratio)
    if not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(fill, int) or not 0 <= fill <= 255:
        raise ValueError(f"fill must be an int in [0, 255], got {fill!r}")
    images = [np.ascontiguousarray(im) for im in images]
    if out is not None:
        if len(out) != len(images):
            raise ValueError(f"out must have one array per image ({len(images)}), got {len(out)}")
        for i, (o, im) in enumerate(zip(out, images)):
            if (not isinstance(o, np.ndarray) or o.dtype != np.uint8 or o.shape != im.shape
                    or not o.flags.c_contiguous or not o.flags.writeable):
                raise ValueError(f"out[{i}] must be a writeable C-contiguous uint8 array of shape "
                                 f"{im.shape}")
            if np.may_share_memory(o, im):
                raise ValueError(f"out[{i}] overlaps images[{i}]; masking writes a separate copy")

    ext = _pick_backend(backend)
    if ext is not None:
        out = list(out) if out is not None else [np.empty_like(im) for im in images]
        return ext.mask_raw_images(images, seed, sample_ids, image_indices, patch_size, ratio,
                                   exact_ratio, fill, out)
    outputs = []
    for i, (im, sample_id, image_index) in enumerate(zip(images, sample_ids, image_indices)):
        h, w = im.shape[:2]
        gh, gw = -(-h // patch_size), -(-w // patch_size)
        cells = _cell_mask_numpy(image_key(seed, sample_id, image_index), gh * gw, ratio,
                                 exact_ratio).reshape(gh, gw)
        # Per cell row, one byte per pixel-row byte: out = (in & keep) | put (a vectorised select).
        row_bytes = w * im.shape[2]
        masked = cells.repeat(patch_size * im.shape[2], 1)[:, :row_bytes]
        keep = np.where(masked, 0, 255).astype(np.uint8)
        put = np.where(masked, fill, 0).astype(np.uint8)
        dst = np.empty_like(im) if out is None else out[i]
        outputs.append(dst)
        src, dst = im.reshape(h, row_bytes), dst.reshape(h, row_bytes)
        for cy in range(gh):
            rows = slice(cy * patch_size, (cy + 1) * patch_size)
            np.bitwise_and(src[rows], keep[cy], out=dst[rows])
            np.bitwise_or(dst[rows], put[cy], out=dst[rows])
    return outputs


def mask_raw_image(image: np.ndarray, *, seed: int, sample_id: int, image_index: int = 0,
                   ratio: float = 0.6, patch_size: int = 14, fill: int = 0,
                   exact_ratio: bool = False) -> np.ndarray:
    """Masked copy of one uint8 HxWxC image (reference method)."""
    return mask_raw_images([image], seed=seed, sample_ids=[sample_id], image_indices=[image_index],
                           ratio=ratio, patch_size=patch_size, fill=fill,
                           exact_ratio=exact_ratio)[0]


# ---------------------------------------------------------------- patch_aligned: pixel_values rows
def mask_pixel_value_rows(pixel_values, image_grid_thw, *, seed: int, sample_ids: Sequence[int],
                          image_indices: Sequence[int] | None = None, ratio: float = 0.6,
                          fill_values: Sequence[float], channels: int = 3, merge_size: int = 2,
                          exact_ratio: bool = False, backend: str | None = None):
    """Masked copy of processed pixel_values [N, D] (patch_aligned method); same type and dtype.

    Rows of several images are concatenated as the processor does (image i owns t*gh*gw rows of
    ``image_grid_thw[i]``). A masked row gets ``fill_values[c]`` in its c-th block of D/channels
    values (see :func:`processor_fill_values`).
    """
    is_tensor = isinstance(pixel_values, torch.Tensor)
    if not is_tensor and not isinstance(pixel_values, np.ndarray):
        raise TypeError(f"pixel_values must be a torch.Tensor or numpy array, got "
                        f"{type(pixel_values).__name__}")
    if pixel_values.ndim != 2:
        raise ValueError(f"pixel_values must be 2-D [rows, D], got shape {tuple(pixel_values.shape)}")
    grid = np.asarray(image_grid_thw.cpu() if isinstance(image_grid_thw, torch.Tensor)
                      else image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"image_grid_thw must be integer [num_images, 3], got shape {grid.shape}")
    grid = grid.astype(np.int64)
    if (grid <= 0).any() or (grid[:, 1:] % merge_size).any():
        raise ValueError(f"image_grid_thw entries must be positive with h, w multiples of "
                         f"merge_size={merge_size}, got {grid.tolist()}")
    n_rows, d = pixel_values.shape
    if int(grid.prod(1).sum()) != n_rows:
        raise ValueError(f"pixel_values has {n_rows} rows but image_grid_thw needs "
                         f"{int(grid.prod(1).sum())}")
    if channels <= 0 or d % channels:
        raise ValueError(f"channels={channels} must divide the row width {d}")
    if len(fill_values) != channels:
        raise ValueError(f"fill_values must have one value per channel ({channels}), "
                         f"got {len(fill_values)}")
    seed = _check_uint64("seed", seed)
    sample_ids = _check_ids("sample_ids", sample_ids, len(grid))
    image_indices = _check_ids("image_indices", image_indices, len(grid))
    ratio = _check_ratio(ratio)

    # Work on bytes so every dtype (float32, bf16, ...) takes the same path.
    values = pixel_values if is_tensor else torch.from_numpy(np.ascontiguousarray(pixel_values))
    device, dtype = values.device, values.dtype
    rows = values.detach().cpu().contiguous().view(torch.uint8).numpy()
    fill_row = (torch.tensor(list(fill_values), dtype=torch.float64).to(dtype)
                .repeat_interleave(d // channels).view(torch.uint8).numpy())

    ext = _pick_backend(backend)
    if ext is not None:
        out = ext.mask_rows(rows, grid, seed, sample_ids, image_indices, merge_size, ratio,
                            exact_ratio, fill_row)
    else:
        out = rows.copy()
        out[_row_mask_numpy(grid, seed, sample_ids, image_indices, merge_size, ratio,
                            exact_ratio)] = fill_row
    out = torch.from_numpy(out).view(dtype).to(device)
    return out if is_tensor else out.numpy()


def _row_mask_numpy(grid, seed, sample_ids, image_indices, m, ratio, exact) -> np.ndarray:
    masks = []
    for (t, gh, gw), sample_id, image_index in zip(grid.tolist(), sample_ids, image_indices):
        cells = _cell_mask_numpy(image_key(seed, sample_id, image_index), t * gh * gw, ratio, exact)
        # (t, py, px) -> merge-window row order (t, wy, wx, iy, ix), as the processor lays rows out
        masks.append(cells.reshape(t, gh // m, m, gw // m, m).transpose(0, 1, 3, 2, 4).reshape(-1))
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def _pick_backend(backend: str | None):
    if backend is None:
        return _extension()
    if backend == "numpy":
        return None
    if backend == "cpp":
        if _extension() is None:
            raise RuntimeError("backend='cpp' but megatron_papo._patch_mask is not built")
        return _extension()
    raise ValueError(f"backend must be None, 'cpp' or 'numpy', got {backend!r}")


# ---------------------------------------------------------------- fill values
def normalized_fill(fill: int, image_mean: Sequence[float], image_std: Sequence[float]) -> list[float]:
    """(fill/255 - mean_c) / std_c in float64; within 1 float32 ulp of the processor's own value."""
    return [(fill / 255.0 - m) / s for m, s in zip(image_mean, image_std)]


def processor_fill_values(image_processor, fill: int = 0) -> list[float]:
    """Per-channel value the processor itself gives a pixel of value ``fill``: bit-identical to
    what it produces for a black (fill) cell, whatever arithmetic its backend uses."""
    side = image_processor.patch_size * image_processor.merge_size
    image = np.full((side, side, 3), fill, dtype=np.uint8)
    pv = image_processor(images=[image], do_resize=False, return_tensors="np")["pixel_values"]
    return pv[0].reshape(3, -1)[:, 0].tolist()
