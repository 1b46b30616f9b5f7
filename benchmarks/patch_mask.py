"""Patch-masking throughput (reference method, raw uint8 images): C++ extension vs numpy fallback vs
a per-cell Python loop written like the PAPO reference code vs a plain copy of the same bytes.

    python benchmarks/patch_mask.py [--images 64] [--repeats 5]

Last line: speedup_vs_reference_loop=<C++ / loop> fraction_of_memcpy=<C++ / copy>, where copy is
the faster of two ways to produce fresh copies of the same bytes (ndarray.copy per image, np.copyto
into slices of one new buffer); np.copyto into preallocated buffers (no fresh output, the bandwidth
bound) is printed too, and the extension writing into those preallocated buffers (out=) is
compared with the latter.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from megatron_papo.ops import masking  # noqa: E402


def reference_loop(pil_images, ratio=0.6, patch_size=14):
    """The PAPO reference code's masking, operation for operation: its input is a PIL image (as in
    its data pipeline), converted to a float32 array; nested Python loops over the grid with one
    np.random.rand() per cell, partial edge cells clipped with min(), the cell set to 0; back to a
    uint8 PIL image. Our path's input is the uint8 array our data pipeline already holds."""
    outputs = []
    for pil_img in pil_images:
        img = np.array(pil_img).astype(np.float32)
        h, w = img.shape[:2]
        for y in range(0, h, patch_size):
            for x in range(0, w, patch_size):
                if np.random.rand() < ratio:
                    y_end, x_end = min(y + patch_size, h), min(x + patch_size, w)
                    if img.ndim == 3:
                        img[y:y_end, x:x_end, :] = 0
                    else:
                        img[y:y_end, x:x_end] = 0
        outputs.append(Image.fromarray(img.astype(np.uint8)))
    return outputs


def copy_into_one_buffer(images):
    """Fresh copies laid out like the extension's output: slices of one new buffer."""
    buffer = np.empty(sum(im.nbytes for im in images), np.uint8)
    outputs, offset = [], 0
    for im in images:
        out = buffer[offset:offset + im.nbytes].reshape(im.shape)
        np.copyto(out, im)
        outputs.append(out)
        offset += im.nbytes
    return outputs


def images_per_second(runs, n_images, repeats):
    """Best of `repeats` per method, methods interleaved so load from other processes hits all."""
    best = {name: float("inf") for name in runs}
    for fn in runs.values():
        fn()  # warm-up (first allocations, lazy imports)
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n_images / seconds for name, seconds in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(448, 1025)), int(rng.integers(448, 769))) for _ in range(args.images)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    sample_ids = list(range(args.images))
    megabytes = sum(im.nbytes for im in images) / 2**20
    buffers = [np.empty_like(im) for im in images]
    pil_images = [Image.fromarray(im) for im in images]

    def copy_into():
        for src, dst in zip(images, buffers):
            np.copyto(dst, src)

    runs = {
        "reference loop (Python)": lambda: reference_loop(pil_images),
        "numpy fallback": lambda: masking.mask_raw_images(images, seed=0, sample_ids=sample_ids,
                                                          backend="numpy"),
        "memcpy (ndarray.copy per image)": lambda: [im.copy() for im in images],
        "memcpy (np.copyto, one fresh buffer)": lambda: copy_into_one_buffer(images),
        "memcpy (np.copyto, preallocated)": copy_into,
    }
    if masking.extension_available():
        runs["C++ extension"] = lambda: masking.mask_raw_images(images, seed=0, sample_ids=sample_ids,
                                                                backend="cpp")
        runs["C++ extension, out= preallocated"] = lambda: masking.mask_raw_images(
            images, seed=0, sample_ids=sample_ids, out=buffers, backend="cpp")
    rates = images_per_second(runs, args.images, args.repeats)

    print(f"{args.images} images, {megabytes:.1f} MiB, HxW in [448, 1024] x [448, 768], best of "
          f"{args.repeats}")
    print(f"{'method':<38} {'images/s':>10} {'MiB/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<38} {rate:>10.1f} {rate * megabytes / args.images:>10.1f}")
    cpp = rates.get("C++ extension", float("nan"))
    # the fastest way to produce fresh copies of the same bytes on this machine
    copy = max(rates["memcpy (np.copyto, one fresh buffer)"], rates["memcpy (ndarray.copy per image)"])
    loop = rates["reference loop (Python)"]
    print(f"bound: any masking that writes fresh output is at most copy/loop = {copy / loop:.1f}x "
          f"the loop (single-threaded copy)")
    if "C++ extension" in rates:
        cpp_out, copy_out = rates["C++ extension, out= preallocated"], rates["memcpy (np.copyto, preallocated)"]
        print(f"into preallocated buffers: speedup_vs_reference_loop={cpp_out / loop:.1f} "
              f"fraction_of_memcpy={cpp_out / copy_out:.2f}")
    print(f"speedup_vs_reference_loop={cpp / loop:.1f} fraction_of_memcpy={cpp / copy:.2f}")


if __name__ == "__main__":
    main()
