// CPU kernel of mtkernels::ensemble_topk (ARCHITECTURE.md §3.3): fuse S score matrices and keep
// the top-k items of every row in one pass over the scores.
//
// Rows are independent: at::parallel_for over rows, one TopKSelector and a few chunk buffers per
// thread. Weighted mode streams each row in chunks of kChunk items (8 KiB per source, in L1).
// While the selector holds fewer than k items, a chunk's fused scores are computed source by
// source (vector loops, fast_math.h) and all offered. After that, one pass over the chunk computes
// a cheap upper bound of every item's fused score (a few vector operations per source, no exp)
// and only the items whose bound beats the current k-th best get their exact score; on typical
// scores that is well under 1% of the items, so the pass runs at close to memory speed (when a
// chunk yields more than a quarter of its items, the next one is computed densely). Excluded
// items are skipped by the selector, which walks the row's sorted exclusion list alongside.
// The fused [B, N] matrix never exists.
// RRF mode needs every source's full ranking of the row, so it keeps one fused row per thread and
// ranks each source with a stable LSD radix sort of order-preserving integer keys (linear in N;
// stability gives the smaller index first among equal scores).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <string_view>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "ensemble_topk/ensemble_topk.h"
#include "ensemble_topk/cpu/fast_math.h"
#include "ensemble_topk/cpu/topk_selector.h"

namespace mtkernels {
namespace {

constexpr int64_t kChunk = 2048;

// ---- reading scores as float32 ------------------------------------------------------------------

// Returns `count` scores as float32: the source itself for float32, else converted into `buffer`.
inline const float* as_float(const float* source, int64_t /*count*/, float* /*buffer*/) {
  return source;
}

inline const float* as_float(const double* source, int64_t count, float* buffer) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    buffer[i] = static_cast<float>(source[i]);
  }
  return buffer;
}

inline const float* as_float(const c10::BFloat16* source, int64_t count, float* buffer) {
  // bfloat16 is the top half of a float32.
  const auto* bits = reinterpret_cast<const uint16_t*>(source);
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    buffer[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
  }
  return buffer;
}

inline const float* as_float(const c10::Half* source, int64_t count, float* buffer) {
  int64_t i = 0;
#if defined(__F16C__)
  const auto* bits = reinterpret_cast<const uint16_t*>(source);
  for (; i + 8 <= count; i += 8) {
    const __m128i half8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + i));
    _mm256_storeu_ps(buffer + i, _mm256_cvtph_ps(half8));
  }
#endif
  for (; i < count; ++i) {
    buffer[i] = static_cast<float>(source[i]);
  }
  return buffer;
}

// ---- weighted fusion -----------------------------------------------------------------------------

// The sources of non-zero weight: a zero-weight source contributes nothing, not even the NaN of
// 0 * inf, so it is never read.
struct Source {
  const char* data;    // row 0, item 0
  int64_t row_stride;  // in elements
  float weight;
  int64_t transform;
};

// One source's scores for the current chunk, as float32.
struct ChunkSource {
  const float* x;
  float weight;
  int64_t transform;
};

template <int64_t kTransform>
MTK_INLINE float apply(float x) {
  if constexpr (kTransform == kSigmoid) {
    return fast_math::sigmoid(x);
  } else if constexpr (kTransform == kLogSigmoid) {
    return fast_math::log_sigmoid(x);
  } else {
    return x;
  }
}

#if defined(MTK_HAVE_AVX2)
template <int64_t kTransform>
MTK_INLINE __m256 apply(__m256 x) {
  if constexpr (kTransform == kSigmoid) {
    return fast_math::avx2::sigmoid(x);
  } else if constexpr (kTransform == kLogSigmoid) {
    return fast_math::avx2::log_sigmoid(x);
  } else {
    return x;
  }
}
#endif

// fused[i] (+)= weight * transform(x[i]) over a chunk: one source at a time, in source order, so
// each loop is a straight vector loop. The first source's term is assigned (not added to 0) and
// later terms use one fused multiply-add, in the vector body and the scalar tail alike.
template <int64_t kTransform>
void accumulate(float* __restrict fused, const float* __restrict x, int64_t count, float weight,
                bool first) {
  int64_t i = 0;
#if defined(MTK_HAVE_AVX2)
  const __m256 w = _mm256_set1_ps(weight);
  if (first) {
    for (; i + 8 <= count; i += 8) {
      _mm256_storeu_ps(fused + i, _mm256_mul_ps(w, apply<kTransform>(_mm256_loadu_ps(x + i))));
    }
  } else {
    for (; i + 8 <= count; i += 8) {
      const __m256 term = apply<kTransform>(_mm256_loadu_ps(x + i));
      _mm256_storeu_ps(fused + i, _mm256_fmadd_ps(w, term, _mm256_loadu_ps(fused + i)));
    }
  }
#endif
  for (; i < count; ++i) {
    const float term = apply<kTransform>(x[i]);
    fused[i] = first ? weight * term : MTK_FMA(weight, term, fused[i]);
  }
}

void accumulate(const ChunkSource& source, float* fused, int64_t count, bool first) {
  switch (source.transform) {
    case kSigmoid:
      accumulate<kSigmoid>(fused, source.x, count, source.weight, first);
      break;
    case kLogSigmoid:
      accumulate<kLogSigmoid>(fused, source.x, count, source.weight, first);
      break;
    default:
      accumulate<kIdentity>(fused, source.x, count, source.weight, first);
  }
}

// Upper bound of the fused scores, for pruning in the style of MaxScore (Turtle and Flood, 1995):
// an item whose bound does not exceed the current top-k threshold cannot enter the top-k, so its
// transforms are never computed. Each term w * t(x) is bounded by w * clamp(a * x + b, lo, hi),
// a handful of vector operations against the ~20 of an exact sigmoid:
//   identity:            x itself (a = 1, b = 0, no clamp);
//   sigmoid, w >= 0:     sigmoid(x) <= clamp(1/2 + x/4, 1/2, 1)  (the tangent at 0 bounds the
//                        concave half; sigmoid <= 1/2 on the other);
//   sigmoid, w < 0:      sigmoid(x) >= clamp(1/2 + x/4, 0, 1/2)  (the same, mirrored);
//   log-sigmoid, w >= 0: log sigmoid(x) <= min(x, 0);
//   log-sigmoid, w < 0:  log sigmoid(x) >= min(x, 0) - log 2.
// The bound must hold for the rounded scores too: `margin` (a few ulps of the sum of the terms'
// magnitudes) covers the rounding of both sums and the 1-3 ulp error of fast_math.
struct TermBound {
  float a, b, lo, hi;
};

TermBound term_bound(const Source& source) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kLog2Below = -0.693147242f;  // -log(2) rounded down
  switch (source.transform) {
    case kSigmoid:
      return source.weight >= 0.0f ? TermBound{0.25f, 0.5f, 0.5f, 1.0f}
                                   : TermBound{0.25f, 0.5f, 0.0f, 0.5f};
    case kLogSigmoid:
      return source.weight >= 0.0f ? TermBound{1.0f, 0.0f, -kInf, 0.0f}
                                   : TermBound{1.0f, kLog2Below, -kInf, kLog2Below};
    default:
      return TermBound{1.0f, 0.0f, -kInf, kInf};
  }
}

// Appends to `candidates` the items i of the chunk whose bound (sum over sources of the term
// bounds, plus the rounding margin) exceeds `threshold`; returns their number. One pass over the
// chunk, all sources at once, nothing stored but the candidates.
int64_t find_candidates(const std::vector<ChunkSource>& chunk, const std::vector<TermBound>& bounds,
                        int64_t count, float threshold, float margin, int32_t* candidates) {
  const size_t num_sources = chunk.size();
  int64_t num_candidates = 0;
  int64_t i = 0;
#if defined(MTK_HAVE_AVX2)
  const __m256 threshold8 = _mm256_set1_ps(threshold);
  const __m256 margin8 = _mm256_set1_ps(margin);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= count; i += 8) {
    __m256 upper = _mm256_setzero_ps();
    __m256 magnitude = _mm256_setzero_ps();
    for (size_t s = 0; s < num_sources; ++s) {
      const TermBound& bound = bounds[s];
      const __m256 x = _mm256_loadu_ps(chunk[s].x + i);
      // min/max return their second operand on NaN: a NaN score keeps a NaN bound
      const __m256 t = _mm256_min_ps(
          _mm256_set1_ps(bound.hi),
          _mm256_max_ps(_mm256_set1_ps(bound.lo),
                        _mm256_fmadd_ps(x, _mm256_set1_ps(bound.a), _mm256_set1_ps(bound.b))));
      const __m256 term = _mm256_mul_ps(_mm256_set1_ps(chunk[s].weight), t);
      upper = _mm256_add_ps(upper, term);
      magnitude = _mm256_add_ps(magnitude, _mm256_andnot_ps(sign, term));
    }
    upper = _mm256_fmadd_ps(magnitude, margin8, upper);
    auto passed =
        static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(upper, threshold8, _CMP_GT_OQ)));
    while (passed != 0) {
      candidates[num_candidates++] = static_cast<int32_t>(i + std::countr_zero(passed));
      passed &= passed - 1;
    }
  }
#endif
  for (; i < count; ++i) {
    float upper = 0.0f;
    float magnitude = 0.0f;
    for (size_t s = 0; s < num_sources; ++s) {
      const TermBound& bound = bounds[s];
      float t = MTK_FMA(chunk[s].x[i], bound.a, bound.b);
      t = bound.lo > t ? bound.lo : t;  // NaN kept
      t = bound.hi < t ? bound.hi : t;
      const float term = chunk[s].weight * t;
      upper += term;
      magnitude += std::fabs(term);
    }
    if (MTK_FMA(magnitude, margin, upper) > threshold) {
      candidates[num_candidates++] = static_cast<int32_t>(i);
    }
  }
  return num_candidates;
}

// One row's sorted exclusions (buffer reused across rows).
ExclusionCursor row_exclusions(const int64_t* offsets, const int64_t* indices, int64_t row,
                               std::vector<int64_t>& buffer) {
  if (offsets == nullptr) {
    return {};
  }
  buffer.assign(indices + offsets[row], indices + offsets[row + 1]);
  std::sort(buffer.begin(), buffer.end());
  return {buffer.data(), buffer.data() + buffer.size()};
}

template <typename scalar_t>
void weighted_rows(const std::vector<Source>& sources, int64_t num_items, int64_t k,
                   const int64_t* exclude_offsets, const int64_t* exclude_indices, int64_t row_begin,
                   int64_t row_end, float* out_values, int64_t* out_indices) {
  const size_t num_sources = sources.size();
  std::vector<TermBound> bounds;
  for (const Source& source : sources) {
    bounds.push_back(term_bound(source));
  }
  const float margin = static_cast<float>(num_sources + 8) * std::numeric_limits<float>::epsilon();
  std::vector<ChunkSource> chunk(num_sources);
  for (size_t s = 0; s < num_sources; ++s) {
    chunk[s] = {nullptr, sources[s].weight, sources[s].transform};
  }
  std::vector<float> converted(std::is_same_v<scalar_t, float> ? 0 : num_sources * kChunk);
  std::vector<float> fused(kChunk);
  std::vector<float> gathered(num_sources * kChunk);
  std::vector<int32_t> candidates(kChunk);
  std::vector<int64_t> excluded;
  TopKSelector selector;
  for (int64_t row = row_begin; row < row_end; ++row) {
    ExclusionCursor cursor = row_exclusions(exclude_offsets, exclude_indices, row, excluded);
    selector.reset(k, num_items);
    bool dense = false;
    for (int64_t start = 0; start < num_items; start += kChunk) {
      const int64_t count = std::min(kChunk, num_items - start);
      for (size_t s = 0; s < num_sources; ++s) {
        const auto* row_scores = reinterpret_cast<const scalar_t*>(sources[s].data) +
                                 row * sources[s].row_stride + start;
        chunk[s].x = as_float(row_scores, count, converted.data() + s * kChunk);
      }
      if (selector.filling() || dense) {
        // Every item's fused score, source by source, then the threshold scan.
        for (size_t s = 0; s < num_sources; ++s) {
          accumulate(chunk[s], fused.data(), count, s == 0);
        }
        if (num_sources == 0) {
          std::fill(fused.begin(), fused.begin() + count, 0.0f);
        }
        selector.offer(fused.data(), count, start, cursor);
        dense = false;  // try pruning again on the next chunk
        continue;
      }
      // Pruning: the bound of every item, then the exact score of the few items whose bound
      // exceeds the threshold (gathered into short arrays, so the loops stay vector loops; the
      // chunk is in L1/L2 by then, having just been read by the bound pass).
      const int64_t num_candidates = find_candidates(chunk, bounds, count, selector.threshold(),
                                                     margin, candidates.data());
      // When many items pass (scores rising along the row, a bound too loose for these
      // weights), gathering costs more than it saves: the next chunk is computed densely.
      dense = num_candidates * 4 > count;
      if (num_candidates == 0) {
        continue;
      }
      for (size_t s = 0; s < num_sources; ++s) {
        float* gathered_x = gathered.data() + s * kChunk;
        const float* x = chunk[s].x;
        for (int64_t c = 0; c < num_candidates; ++c) {
          gathered_x[c] = x[candidates[c]];
        }
        accumulate(ChunkSource{gathered_x, chunk[s].weight, chunk[s].transform}, fused.data(),
                   num_candidates, s == 0);
      }
      for (int64_t c = 0; c < num_candidates; ++c) {
        selector.offer(&fused[c], 1, start + candidates[c], cursor);
      }
    }
    selector.finish(out_values + row * k, out_indices + row * k);
  }
}

// ---- reciprocal rank fusion ---------------------------------------------------------------------

// Stable LSD radix sort of (key, item) pairs by key, 8 bits a pass; passes where every key has the
// same byte are skipped. `keys`/`items` hold the input and receive the output.
void radix_sort(std::vector<uint32_t>& keys, std::vector<uint32_t>& items,
                std::vector<uint32_t>& keys_tmp, std::vector<uint32_t>& items_tmp, size_t count) {
  std::array<std::array<uint32_t, 256>, 4> histogram{};
  for (size_t i = 0; i < count; ++i) {
    const uint32_t key = keys[i];
    ++histogram[0][key & 0xff];
    ++histogram[1][(key >> 8) & 0xff];
    ++histogram[2][(key >> 16) & 0xff];
    ++histogram[3][key >> 24];
  }
  keys_tmp.resize(keys.size());
  items_tmp.resize(items.size());
  for (int pass = 0; pass < 4; ++pass) {
    auto& counts = histogram[pass];
    const int shift = 8 * pass;
    if (counts[(keys[0] >> shift) & 0xff] == count) {
      continue;
    }
    uint32_t position = 0;
    for (auto& c : counts) {
      const uint32_t n = c;
      c = position;
      position += n;
    }
    for (size_t i = 0; i < count; ++i) {
      const uint32_t slot = counts[(keys[i] >> shift) & 0xff]++;
      keys_tmp[slot] = keys[i];
      items_tmp[slot] = items[i];
    }
    keys.swap(keys_tmp);
    items.swap(items_tmp);
  }
}

template <typename scalar_t>
void rrf_rows(const std::vector<Source>& sources, int64_t num_items, int64_t k, float rrf_c,
              const int64_t* exclude_offsets, const int64_t* exclude_indices, int64_t row_begin,
              int64_t row_end, float* out_values, int64_t* out_indices) {
  std::vector<float> fused(num_items);
  std::vector<float> converted(kChunk);
  std::vector<uint32_t> keys(num_items), items(num_items), keys_tmp, items_tmp;
  std::vector<int64_t> excluded;
  TopKSelector selector;
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  for (int64_t row = row_begin; row < row_end; ++row) {
    std::fill(fused.begin(), fused.end(), 0.0f);
    for (const Source& source : sources) {
      // Keys of the numbers in item order (NaN scores get no rank and make the fused score NaN).
      size_t count = 0;
      for (int64_t start = 0; start < num_items; start += kChunk) {
        const int64_t chunk = std::min(kChunk, num_items - start);
        const auto* row_scores =
            reinterpret_cast<const scalar_t*>(source.data) + row * source.row_stride + start;
        const float* x = as_float(row_scores, chunk, converted.data());
        for (int64_t i = 0; i < chunk; ++i) {
          if (std::isnan(x[i])) {
            fused[start + i] = kNaN;
          } else {
            keys[count] = ~ordered_key(x[i]);  // ascending key = descending score
            items[count] = static_cast<uint32_t>(start + i);
            ++count;
          }
        }
      }
      if (count == 0) {
        continue;
      }
      radix_sort(keys, items, keys_tmp, items_tmp, count);
      for (size_t rank = 0; rank < count; ++rank) {
        fused[items[rank]] += source.weight / (rrf_c + static_cast<float>(rank + 1));
      }
    }
    if (exclude_offsets != nullptr) {
      for (int64_t j = exclude_offsets[row]; j < exclude_offsets[row + 1]; ++j) {
        fused[exclude_indices[j]] = kNaN;
      }
    }
    selector.reset(k, num_items);
    ExclusionCursor none;
    selector.offer(fused.data(), num_items, 0, none);
    selector.finish(out_values + row * k, out_indices + row * k);
  }
}

// ---- checks and entry point -----------------------------------------------------------------------

// The exclusions checked (ensemble_topk.h, then every index in [0, N)), as contiguous int64.
std::pair<at::Tensor, at::Tensor> checked_exclusions(const at::Tensor& offsets_in,
                                                     const at::Tensor& indices_in,
                                                     int64_t batch_size, int64_t num_items) {
  at::Tensor offsets =
      checked_exclusion_offsets(offsets_in, indices_in, at::Device(at::kCPU), batch_size);
  at::Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t nnz = indices.numel();
  const int64_t* x = indices.data_ptr<int64_t>();
  for (int64_t j = 0; j < nnz; ++j) {
    TORCH_CHECK_VALUE(x[j] >= 0 && x[j] < num_items, "exclude_indices must lie in [0, N=", num_items,
                      "), got ", x[j]);
  }
  return {offsets, indices};
}

std::tuple<at::Tensor, at::Tensor> ensemble_topk_cpu(
    at::TensorList scores, at::ArrayRef<double> weights, int64_t k, at::IntArrayRef transforms,
    const std::optional<at::Tensor>& exclude_offsets,
    const std::optional<at::Tensor>& exclude_indices, c10::string_view mode, double rrf_c) {
  const std::string_view mode_name(mode.data(), mode.size());
  check_ensemble_topk_args(scores, weights, k, transforms, exclude_offsets, exclude_indices,
                           mode_name, rrf_c);
  const auto num_sources = static_cast<int64_t>(scores.size());
  const at::Tensor& first = scores[0];
  TORCH_CHECK_VALUE(first.device().is_cpu(), "scores must be CPU tensors here, got ", first.device());

  const int64_t batch_size = first.size(0);
  const int64_t num_items = first.size(1);
  // Candidates pack the item index in 32 bits (topk_selector.h).
  TORCH_CHECK_VALUE(num_items < (int64_t{1} << 32), "scores must have fewer than 2^32 items per row, got ",
                    num_items);
  at::Tensor offsets, indices;
  if (exclude_offsets.has_value()) {
    std::tie(offsets, indices) =
        checked_exclusions(*exclude_offsets, *exclude_indices, batch_size, num_items);
  }

  at::Tensor values = at::empty({batch_size, k}, first.options().dtype(at::kFloat));
  at::Tensor items = at::empty({batch_size, k}, first.options().dtype(at::kLong));
  if (batch_size == 0 || k == 0) {
    return {values, items};
  }

  std::vector<at::Tensor> rows_contiguous;  // keeps copies alive where a row was strided
  std::vector<Source> sources;
  for (int64_t s = 0; s < num_sources; ++s) {
    if (weights[s] == 0.0) {
      continue;
    }
    at::Tensor source = scores[s];
    if (source.stride(1) != 1) {
      source = source.contiguous();
      rows_contiguous.push_back(source);
    }
    sources.push_back({static_cast<const char*>(source.const_data_ptr()), source.stride(0),
                       static_cast<float>(weights[s]), transforms[s]});
  }
  const int64_t* offsets_data = offsets.defined() ? offsets.const_data_ptr<int64_t>() : nullptr;
  const int64_t* indices_data = indices.defined() ? indices.const_data_ptr<int64_t>() : nullptr;
  float* values_data = values.data_ptr<float>();
  int64_t* items_data = items.data_ptr<int64_t>();
  const bool rrf = mode_name == "rrf";
  const auto c = static_cast<float>(rrf_c);
  // About 64K scores per task, so that tiny rows are not split across threads.
  const int64_t work_per_row = std::max<int64_t>(1, num_items * std::max<int64_t>(1, sources.size()));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_row);

  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    at::parallel_for(0, batch_size, grain, [&](int64_t begin, int64_t end) {
      if (rrf) {
        rrf_rows<scalar_t>(sources, num_items, k, c, offsets_data, indices_data, begin, end,
                           values_data, items_data);
      } else {
        weighted_rows<scalar_t>(sources, num_items, k, offsets_data, indices_data, begin, end,
                                values_data, items_data);
      }
    });
  };
  switch (first.scalar_type()) {
    case at::kHalf:
      run(c10::Half{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    case at::kDouble:
      run(double{});
      break;
    default:
      run(float{});
  }
  return {values, items};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) { m.impl("ensemble_topk", &ensemble_topk_cpu); }

}  // namespace mtkernels
