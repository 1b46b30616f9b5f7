"""Seeded patch masking: C++ == numpy fallback, determinism, statistics, the raw <-> pixel_values
mapping through the real Qwen2-VL image processor, and argument errors."""
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_papo.ops import masking

needs_ext = pytest.mark.skipif(not masking.extension_available(),
                               reason="megatron_papo._patch_mask not built (setup.py build_ext --inplace)")

RAW_SIZES = [(30, 30, 3), (14, 14, 3), (1, 1, 3), (13, 29, 1), (100, 57, 4), (448, 336, 3), (0, 5, 3)]
RATIOS = [0.0, 0.6, 1.0, 0.25]


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, size, dtype=np.uint8) for size in sizes]


def _loop_reference(image, cells, patch_size, fill):
    """Per-cell walk written like the PAPO reference code, with decisions taken from ``cells``."""
    out = image.copy()
    h, w = image.shape[:2]
    for y in range(0, h, patch_size):
        for x in range(0, w, patch_size):
            if cells[y // patch_size, x // patch_size]:
                out[y:y + patch_size, x:x + patch_size, :] = fill
    return out


def test_splitmix64_known_answer():
    # Vigna's splitmix64.c seeded with 1234567: the first outputs (published test vector).
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423,
                4593380528125082431, 16408922859458223821]
    cells = np.arange(1, 6, dtype=np.uint64)
    draws = masking._mix64(np.uint64(1234567) + cells * np.uint64(masking._GOLDEN))
    assert draws.tolist() == expected


@pytest.mark.parametrize("ratio", [0.0, 0.6, 1.0, 0.37])
def test_bernoulli_rule_is_top53_bits_below_ratio(ratio):
    n = 5000
    key = masking.image_key(7, 8, 9)
    draws = masking._mix64(np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64)
                           * np.uint64(masking._GOLDEN))
    u = (draws >> np.uint64(11)).astype(np.float64) * 2.0**-53  # exact: < 2**53
    expected = u < ratio
    got = masking.cell_mask(1, n, seed=7, sample_id=8, image_index=9, ratio=ratio)[0]
    np.testing.assert_array_equal(got, expected)


@needs_ext
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("exact", [False, True])
def test_raw_cpp_equals_numpy(ratio, exact):
    images = _images(RAW_SIZES)
    kw = dict(seed=11, sample_ids=list(range(len(images))), image_indices=[3] * len(images),
              ratio=ratio, patch_size=14, fill=0, exact_ratio=exact)
    cpp = masking.mask_raw_images(images, backend="cpp", **kw)
    ref = masking.mask_raw_images(images, backend="numpy", **kw)
    for a, b, im in zip(cpp, ref, images):
        assert a.dtype == np.uint8 and a.shape == im.shape
        np.testing.assert_array_equal(a, b)
    # the inputs are untouched
    for im, fresh in zip(images, _images(RAW_SIZES)):
        np.testing.assert_array_equal(im, fresh)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpp", marks=needs_ext)])
def test_raw_into_out_buffers(backend):
    images = _images(RAW_SIZES)
    kw = dict(seed=4, sample_ids=list(range(len(images))), backend=backend)
    fresh = masking.mask_raw_images(images, **kw)
    out = [np.full_like(im, 9) for im in images]
    got = masking.mask_raw_images(images, out=out, **kw)
    for g, o, f in zip(got, out, fresh):
        assert g is o
        np.testing.assert_array_equal(o, f)
    with pytest.raises(ValueError, match=r"out\[1\].*shape"):
        masking.mask_raw_images(images, out=[out[0], out[0]] + out[2:], **kw)
    with pytest.raises(ValueError, match=r"out\[0\] overlaps"):
        masking.mask_raw_images(images, out=images, **kw)
    with pytest.raises(ValueError, match="out must have one array per image"):
        masking.mask_raw_images(images, out=out[:1], **kw)


@needs_ext
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_cpp_equals_numpy(ratio, exact, dtype):
    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [2, 4, 4], [1, 16, 10]])
    pv = torch.randn(int(grid.prod(1).sum()), 1176).to(dtype)
    kw = dict(seed=5, sample_ids=[0, 0, 1, 9], image_indices=[0, 1, 0, 0], ratio=ratio,
              fill_values=[-1.5, 0.25, 3.0], exact_ratio=exact)
    cpp = masking.mask_pixel_value_rows(pv, grid, backend="cpp", **kw)
    ref = masking.mask_pixel_value_rows(pv, grid, backend="numpy", **kw)
    assert cpp.dtype == dtype and cpp.shape == pv.shape
    assert torch.equal(cpp.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    # numpy in -> numpy out, same values
    if dtype == torch.float32:
        out_np = masking.mask_pixel_value_rows(pv.numpy(), grid.numpy(), **kw)
        assert isinstance(out_np, np.ndarray)
        np.testing.assert_array_equal(out_np, cpp.numpy())


def test_rows_follow_merge_window_order_and_channel_blocks():
    # Independent reference: walk the patches (py, px), compute the processor's row index.
    gh, gw, fill = 6, 8, [-1.0, 0.5, 2.0]
    pv = torch.randn(gh * gw, 1176)
    out = masking.mask_pixel_value_rows(pv, [[1, gh, gw]], seed=2, sample_ids=[4], ratio=0.5,
                                        fill_values=fill)
    cells = masking.cell_mask(gh, gw, seed=2, sample_id=4, ratio=0.5)
    fill_row = torch.tensor(fill).repeat_interleave(392)
    for py in range(gh):
        for px in range(gw):
            row = ((py // 2) * (gw // 2) + px // 2) * 4 + (py % 2) * 2 + (px % 2)
            assert torch.equal(out[row], fill_row if cells[py, px] else pv[row])


def test_same_mask_in_a_separate_process():
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "tests/dist/cell_mask.py"), "20", "31", "123", "45", "2", "0.6"],
                         capture_output=True, text=True, check=True, cwd=repo,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)})
    here = masking.cell_mask(20, 31, seed=123, sample_id=45, image_index=2, ratio=0.6)
    assert out.stdout.strip() == "".join("1" if v else "0" for v in here.ravel())


def test_different_seed_sample_image_give_different_masks():
    base = dict(seed=1, sample_id=2, image_index=3)
    ref = masking.cell_mask(32, 32, **base)
    for change in [dict(seed=4), dict(sample_id=5), dict(image_index=0), dict(seed=2**64 - 1)]:
        other = masking.cell_mask(32, 32, **{**base, **change})
        # independent masks of 1024 cells agree on ~52% of cells; identical would be ~0 chance
        assert 0.4 < (other == ref).mean() < 0.65


def test_ratio_statistics():
    n_images, gh, gw, p = 200, 32, 32, 0.6
    n = n_images * gh * gw
    frac = np.mean([masking.cell_mask(gh, gw, seed=9, sample_id=i, ratio=p).mean()
                    for i in range(n_images)])
    sigma = math.sqrt(p * (1 - p) / n)  # binomial std of the fraction, 0.0024 for 204800 cells
    assert abs(frac - p) < 5 * sigma
    # exact_ratio: exactly round(ratio * n_cells) per image
    for n_cells, ratio in [(1024, 0.6), (9, 0.6), (7, 0.5), (10, 0.25), (3, 1.0), (5, 0.0)]:
        got = masking.cell_mask(1, n_cells, seed=0, sample_id=n_cells, ratio=ratio,
                                exact_ratio=True).sum()
        assert got == math.floor(ratio * n_cells + 0.5)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpp", marks=needs_ext)])
def test_edge_cells_partial_and_all_channels_filled(backend):
    image = _images([(30, 30, 4)])[0]
    out = masking.mask_raw_images([image], seed=0, sample_ids=[0], ratio=1.0, fill=7,
                                  backend=backend)[0]
    assert (out == 7).all()  # 3x3 cells cover 30x30, last row/column of cells 2 px wide
    cells = masking.cell_mask(3, 3, seed=3, sample_id=1, ratio=0.5)
    assert 0 < cells.sum() < 9
    out = masking.mask_raw_images([image], seed=3, sample_ids=[1], ratio=0.5, fill=255,
                                  backend=backend)[0]
    np.testing.assert_array_equal(out, _loop_reference(image, cells, 14, 255))
    # every size matches the loop reference (edge cells partial), several patch sizes
    for size in RAW_SIZES:
        for patch_size in (14, 5):
            im = _images([size], seed=1)[0]
            gh, gw = -(-size[0] // patch_size), -(-size[1] // patch_size)
            cells = masking.cell_mask(gh, gw, seed=8, sample_id=2, ratio=0.6)
            got = masking.mask_raw_images([im], seed=8, sample_ids=[2], patch_size=patch_size,
                                          backend=backend)[0]
            np.testing.assert_array_equal(got, _loop_reference(im, cells, patch_size, 0))


def test_raw_masking_through_processor_equals_patch_aligned_rows():
    transformers = pytest.importorskip("transformers", reason="needs transformers (HF image processor)")
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=4096 * 28 * 28)
    sizes = [(56, 84, 3), (112, 56, 3), (28, 28, 3)]  # multiples of 28: the processor keeps the size
    images = _images(sizes, seed=4)
    sample_ids, image_indices = [10, 10, 11], [0, 1, 0]
    clean = processor(images=images, return_tensors="np")
    grid = clean["image_grid_thw"]
    assert grid.tolist() == [[1, h // 14, w // 14] for h, w, _ in sizes]
    masked_raw = masking.mask_raw_images(images, seed=77, sample_ids=sample_ids,
                                         image_indices=image_indices)
    via_processor = processor(images=masked_raw, return_tensors="np")["pixel_values"]
    fill_values = masking.processor_fill_values(processor, fill=0)
    via_rows = masking.mask_pixel_value_rows(clean["pixel_values"], grid, seed=77,
                                             sample_ids=sample_ids, image_indices=image_indices,
                                             fill_values=fill_values)
    assert not np.array_equal(via_rows, clean["pixel_values"])
    np.testing.assert_array_equal(via_rows, via_processor)  # exact: same float32 fill bits
    # the float64 formula differs from the processor's float32 arithmetic by at most 1 ulp
    formula = masking.normalized_fill(0, processor.image_mean, processor.image_std)
    np.testing.assert_allclose(formula, fill_values, rtol=2 * np.finfo(np.float32).eps)


def test_bad_inputs_name_the_argument():
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(TypeError, match=r"images\[0\].*uint8"):
        masking.mask_raw_image(image.astype(np.float32), seed=0, sample_id=0)
    with pytest.raises(ValueError, match=r"images\[0\].*HxWxC"):
        masking.mask_raw_image(image[..., 0], seed=0, sample_id=0)
    with pytest.raises(ValueError, match="ratio"):
        masking.mask_raw_image(image, seed=0, sample_id=0, ratio=1.5)
    with pytest.raises(ValueError, match="ratio"):
        masking.cell_mask(2, 2, seed=0, sample_id=0, ratio=-0.1)
    with pytest.raises(ValueError, match="patch_size"):
        masking.mask_raw_image(image, seed=0, sample_id=0, patch_size=0)
    with pytest.raises(ValueError, match="fill"):
        masking.mask_raw_image(image, seed=0, sample_id=0, fill=256)
    with pytest.raises(ValueError, match="seed"):
        masking.mask_raw_image(image, seed=-1, sample_id=0)
    with pytest.raises(ValueError, match="sample_ids"):
        masking.mask_raw_images([image, image], seed=0, sample_ids=[0])
    with pytest.raises(ValueError, match="image_indices"):
        masking.mask_raw_images([image], seed=0, sample_ids=[0], image_indices=[0, 1])
    with pytest.raises(ValueError, match="backend"):
        masking.mask_raw_images([image], seed=0, sample_ids=[0], backend="cuda")

    pv, grid = torch.zeros(16, 1176), [[1, 4, 4]]
    kw = dict(seed=0, sample_ids=[0], fill_values=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="pixel_values.*2-D"):
        masking.mask_pixel_value_rows(pv.reshape(16, 3, 392), grid, **kw)
    with pytest.raises(ValueError, match="pixel_values has 15 rows"):
        masking.mask_pixel_value_rows(pv[:15], grid, **kw)
    with pytest.raises(ValueError, match="image_grid_thw"):
        masking.mask_pixel_value_rows(pv, [[1, 16]], **kw)
    with pytest.raises(ValueError, match="merge_size"):
        masking.mask_pixel_value_rows(torch.zeros(15, 1176), [[1, 3, 5]], **kw)
    with pytest.raises(ValueError, match="fill_values"):
        masking.mask_pixel_value_rows(pv, grid, **{**kw, "fill_values": [0.0]})
    with pytest.raises(ValueError, match="sample_ids"):
        masking.mask_pixel_value_rows(pv, grid, **{**kw, "sample_ids": [0, 1]})
    with pytest.raises(ValueError, match="channels"):
        masking.mask_pixel_value_rows(torch.zeros(16, 1175), grid, **kw)
    with pytest.raises(TypeError, match="pixel_values"):
        masking.mask_pixel_value_rows(pv.tolist(), grid, **kw)


@pytest.fixture
def hidden_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron_papo._patch_mask", None)  # import now fails
    monkeypatch.delattr("megatron_papo._patch_mask", raising=False)
    masking._extension.cache_clear()
    yield
    masking._extension.cache_clear()


@needs_ext
def test_fallback_when_extension_hidden_warns_once_same_output(request):
    images = _images(RAW_SIZES)
    kw = dict(seed=3, sample_ids=list(range(len(images))))
    expected = masking.mask_raw_images(images, backend="cpp", **kw)
    request.getfixturevalue("hidden_extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = masking.mask_raw_images(images, **kw)
        assert not masking.extension_available()
        masking.cell_mask(3, 3, seed=0, sample_id=0)
    assert [str(w.message).count("numpy fallback") for w in caught] == [1]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="not built"):
        masking.mask_raw_images(images, backend="cpp", **kw)
