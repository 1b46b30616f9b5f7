// Seeded patch masking for PAPO's masked-image branch (see megatron_papo/ops/masking.py).
//
// The mask is a pure function of (seed, sample_id, image_index, cell index): a counter-based
// SplitMix64 hash, identical to the numpy fallback bit for bit, so every rank and a resumed
// run draw the same mask. Outputs are fresh buffers; the input is never modified. Each output
// band of patch_size pixel rows is copied with one memcpy and its masked cells are then filled
// in cache, so the cost is close to a plain copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// SplitMix64 finaliser (Steele, Lea, Flood 2014).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t absorb(uint64_t h, uint64_t v) { return mix64((h ^ v) + kGolden); }

inline uint64_t image_key(uint64_t seed, uint64_t sample_id, uint64_t image_index) {
  return absorb(absorb(absorb(0, seed), sample_id), image_index);
}

// Output number `cell` of a SplitMix64 stream seeded with `key`.
inline uint64_t draw(uint64_t key, uint64_t cell) { return mix64(key + (cell + 1) * kGolden); }

// Bernoulli: masked iff (draw >> 11) < ceil(ratio * 2^53), i.e. u < ratio with u the top 53
// bits as a double in [0, 1). Exact: mask the round(ratio * n) cells with the smallest
// (draw, cell) pairs, a uniformly random subset of that size.
void fill_cell_mask(uint64_t key, int64_t n, double ratio, bool exact, uint8_t* out) {
  if (!exact) {
    const uint64_t threshold = static_cast<uint64_t>(std::ceil(ratio * 9007199254740992.0));
    for (int64_t i = 0; i < n; ++i) out[i] = (draw(key, i) >> 11) < threshold;
    return;
  }
  const int64_t k = static_cast<int64_t>(std::floor(ratio * static_cast<double>(n) + 0.5));
  std::memset(out, 0, n);
  if (k <= 0) return;
  std::vector<std::pair<uint64_t, int64_t>> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = {draw(key, i), i};
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end());
  for (int64_t j = 0; j < k; ++j) out[order[j].second] = 1;
}

void check_ratio(double ratio) {
  if (!(ratio >= 0.0 && ratio <= 1.0))
    throw std::invalid_argument("ratio must be in [0, 1], got " + std::to_string(ratio));
}

py::array_t<bool> cell_mask(uint64_t seed, uint64_t sample_id, uint64_t image_index,
                            int64_t n_cells, double ratio, bool exact) {
  check_ratio(ratio);
  if (n_cells < 0) throw std::invalid_argument("n_cells must be >= 0");
  py::array_t<bool> out(n_cells);
  fill_cell_mask(image_key(seed, sample_id, image_index), n_cells, ratio, exact,
                 reinterpret_cast<uint8_t*>(out.mutable_data()));
  return out;
}

struct RawImage {
  const uint8_t* src;
  uint8_t* dst;
  int64_t h, w, c, ncy, ncx;
  std::vector<uint8_t> cells;
};

// Masks HxWxC uint8 images on a patch_size grid (edge cells partial), all channels set to fill,
// into the caller's `out` arrays (one per image, allocated by numpy: per-image arrays were faster
// than one fresh batch buffer, which page-faulted slower than the masking itself).
py::list mask_raw_images(const std::vector<py::array>& images, uint64_t seed,
                         const std::vector<uint64_t>& sample_ids,
                         const std::vector<uint64_t>& image_indices, int64_t patch_size,
                         double ratio, bool exact, int fill,
                         const std::vector<py::array>& out) {
  check_ratio(ratio);
  if (patch_size <= 0) throw std::invalid_argument("patch_size must be > 0");
  if (fill < 0 || fill > 255) throw std::invalid_argument("fill must be in [0, 255]");
  const size_t n = images.size();
  if (sample_ids.size() != n || image_indices.size() != n)
    throw std::invalid_argument("sample_ids and image_indices need one entry per image");

  std::vector<RawImage> work(n);
  for (size_t i = 0; i < n; ++i) {
    const py::array& im = images[i];
    if (im.ndim() != 3 || !py::isinstance<py::array_t<uint8_t>>(im) ||
        !(im.flags() & py::array::c_style))
      throw std::invalid_argument("images must be C-contiguous uint8 HxWxC arrays");
    RawImage& r = work[i];
    r.src = static_cast<const uint8_t*>(im.data());
    r.h = im.shape(0), r.w = im.shape(1), r.c = im.shape(2);
    r.ncy = (r.h + patch_size - 1) / patch_size;
    r.ncx = (r.w + patch_size - 1) / patch_size;
  }
  py::list outputs;  // the caller's arrays (Python checks: same shapes, no overlap with inputs)
  if (out.size() != n) throw std::invalid_argument("out needs one array per image");
  for (size_t i = 0; i < n; ++i) {
    const py::array& o = out[i];
    if (!py::isinstance<py::array_t<uint8_t>>(o) || !(o.flags() & py::array::c_style) ||
        !o.writeable() || o.size() != work[i].h * work[i].w * work[i].c)
      throw std::invalid_argument("out arrays must be writeable C-contiguous uint8, one per image");
    work[i].dst = static_cast<uint8_t*>(const_cast<void*>(o.data()));
    outputs.append(o);
  }
  // Work items: one row of cells (patch_size pixel rows) of one image, so a single large image
  // still uses every thread.
  std::vector<std::pair<int64_t, int64_t>> bands;  // (image, cell row)
  for (size_t i = 0; i < n; ++i)
    for (int64_t cy = 0; cy < work[i].ncy; ++cy) bands.emplace_back(i, cy);
  const uint8_t fill_byte = static_cast<uint8_t>(fill);

  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
      RawImage& r = work[i];
      r.cells.resize(r.ncy * r.ncx);
      fill_cell_mask(image_key(seed, sample_ids[i], image_indices[i]), r.ncy * r.ncx, ratio,
                     exact, r.cells.data());
    }
#pragma omp parallel
    {
      std::vector<std::pair<int64_t, int64_t>> runs;  // masked byte ranges [lo, hi) of a pixel row
#pragma omp for schedule(dynamic, 8)
      for (int64_t b = 0; b < static_cast<int64_t>(bands.size()); ++b) {
        const RawImage& r = work[bands[b].first];
        const int64_t cy = bands[b].second, row_bytes = r.w * r.c, cell_bytes = patch_size * r.c;
        const uint8_t* cells = r.cells.data() + cy * r.ncx;
        runs.clear();
        for (int64_t cx = 0; cx < r.ncx; ++cx) {
          if (!cells[cx]) continue;
          const int64_t lo = cx * cell_bytes, hi = std::min(lo + cell_bytes, row_bytes);
          if (!runs.empty() && runs.back().second == lo) runs.back().second = hi;
          else runs.emplace_back(lo, hi);
        }
        // One memcpy of the whole band (large copies let libc avoid reading the destination
        // first; row-sized copies or a byte-select loop were ~1.5x slower), then fill its
        // masked runs while they are still in cache.
        const int64_t y0 = cy * patch_size, y1 = std::min(r.h, y0 + patch_size);
        std::memcpy(r.dst + y0 * row_bytes, r.src + y0 * row_bytes, (y1 - y0) * row_bytes);
        for (int64_t y = y0; y < y1; ++y)
          for (const auto& [lo, hi] : runs) std::memset(r.dst + y * row_bytes + lo, fill_byte, hi - lo);
      }
    }
  }
  return outputs;
}

// Masks rows of processed pixel_values, viewed as bytes [N, row_bytes]. Image i owns
// t*gh*gw consecutive rows in merge-window order; its patch (tt, py, px) is cell
// (tt*gh + py)*gw + px, the same cell index as raw masking of an unresized image.
py::array_t<uint8_t> mask_rows(const py::array_t<uint8_t, py::array::c_style>& rows,
                               const py::array_t<int64_t, py::array::c_style>& grid_thw,
                               uint64_t seed, const std::vector<uint64_t>& sample_ids,
                               const std::vector<uint64_t>& image_indices, int64_t merge_size,
                               double ratio, bool exact,
                               const py::array_t<uint8_t, py::array::c_style>& fill_row) {
  check_ratio(ratio);
  if (rows.ndim() != 2) throw std::invalid_argument("rows must be 2-D");
  if (grid_thw.ndim() != 2 || grid_thw.shape(1) != 3)
    throw std::invalid_argument("image_grid_thw must have shape [num_images, 3]");
  if (merge_size <= 0) throw std::invalid_argument("merge_size must be > 0");
  const int64_t n_rows = rows.shape(0), row_bytes = rows.shape(1), m = merge_size;
  const size_t n_images = grid_thw.shape(0);
  if (fill_row.ndim() != 1 || fill_row.shape(0) != row_bytes)
    throw std::invalid_argument("fill_row must have one byte per row byte");
  if (sample_ids.size() != n_images || image_indices.size() != n_images)
    throw std::invalid_argument("sample_ids and image_indices need one entry per image");
  auto g = grid_thw.unchecked<2>();
  std::vector<int64_t> first_row(n_images + 1, 0);
  for (size_t i = 0; i < n_images; ++i) {
    if (g(i, 0) <= 0 || g(i, 1) <= 0 || g(i, 2) <= 0 || g(i, 1) % m || g(i, 2) % m)
      throw std::invalid_argument("image_grid_thw entries must be positive, h and w multiples of merge_size");
    first_row[i + 1] = first_row[i] + g(i, 0) * g(i, 1) * g(i, 2);
  }
  if (first_row[n_images] != n_rows)
    throw std::invalid_argument("pixel_values rows do not match image_grid_thw");

  py::array_t<uint8_t> out({n_rows, row_bytes});
  const uint8_t* src = rows.data();
  const uint8_t* fill = fill_row.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<uint8_t> row_masked(n_rows);
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < static_cast<int64_t>(n_images); ++i) {
      const int64_t gh = g(i, 1), gw = g(i, 2), n = first_row[i + 1] - first_row[i];
      std::vector<uint8_t> cells(n);
      fill_cell_mask(image_key(seed, sample_ids[i], image_indices[i]), n, ratio, exact,
                     cells.data());
      for (int64_t j = 0; j < n; ++j) {
        const int64_t tt = j / (gh * gw), rem = j % (gh * gw);
        const int64_t win = rem / (m * m), in_win = rem % (m * m);
        const int64_t py = (win / (gw / m)) * m + in_win / m;
        const int64_t px = (win % (gw / m)) * m + in_win % m;
        row_masked[first_row[i] + j] = cells[(tt * gh + py) * gw + px];
      }
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n_rows; ++r)
      std::memcpy(dst + r * row_bytes, row_masked[r] ? fill : src + r * row_bytes, row_bytes);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_patch_mask, m) {
  m.doc() = "Seeded patch masking for PAPO (SplitMix64 counter RNG; numpy twin in ops/masking.py)";
  m.def("image_key", &image_key, py::arg("seed"), py::arg("sample_id"), py::arg("image_index"));
  m.def("cell_mask", &cell_mask, py::arg("seed"), py::arg("sample_id"), py::arg("image_index"),
        py::arg("n_cells"), py::arg("ratio"), py::arg("exact"));
  m.def("mask_raw_images", &mask_raw_images, py::arg("images"), py::arg("seed"),
        py::arg("sample_ids"), py::arg("image_indices"), py::arg("patch_size"), py::arg("ratio"),
        py::arg("exact"), py::arg("fill"), py::arg("out"));
  m.def("mask_rows", &mask_rows, py::arg("rows"), py::arg("grid_thw"), py::arg("seed"),
        py::arg("sample_ids"), py::arg("image_indices"), py::arg("merge_size"), py::arg("ratio"),
        py::arg("exact"), py::arg("fill_row"));
}
