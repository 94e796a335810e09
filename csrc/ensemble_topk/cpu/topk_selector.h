// Streaming top-k of one row: items arrive in increasing index order, the best k are kept by
// (value descending, index ascending).
//
// Hot path: one float comparison against a threshold, the value of the current k-th best (a lower
// bound of the final one). Because items arrive in index order, an item whose value merely equals
// the threshold ranks after the k-th best (same value, larger index), so the test is a strict `>`
// and NaN fails it for free. Candidates that pass go to a buffer of capacity max(2k, k + 64); when
// it is full, nth_element keeps the best k and raises the threshold (the buffer-and-partial-sort
// scheme, linear in N even for k = 1000; learned from FAISS's reservoir result handlers, which
// compact a 2k buffer by partitioning, and PyTorch's CPU topk, which runs nth_element then sort).
//
// Candidates are packed in one uint64 whose order is the ranking order: high half the float value
// mapped to an order-preserving unsigned key and complemented (descending), low half the index.
// Sorting and partitioning then compare integers only.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mtkernels {

// Maps a non-NaN float to a uint32 that sorts like the float (-0.0 and +0.0 first made equal).
inline uint32_t ordered_key(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float from_ordered_key(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return std::bit_cast<float>(bits);
}

// One row's excluded items, sorted, queried with non-decreasing item indices (the order in which
// the selector meets items), so each query is amortised O(1).
class ExclusionCursor {
 public:
  ExclusionCursor() = default;
  ExclusionCursor(const int64_t* sorted_begin, const int64_t* sorted_end)
      : next_(sorted_begin), end_(sorted_end) {}

  bool excludes(int64_t index) {
    while (next_ != end_ && *next_ < index) {
      ++next_;
    }
    return next_ != end_ && *next_ == index;
  }

 private:
  const int64_t* next_ = nullptr;
  const int64_t* end_ = nullptr;
};

class TopKSelector {
 public:
  // Prepares for a new row of `num_items` items.
  void reset(int64_t k, int64_t num_items) {
    k_ = k;
    capacity_ = std::max<int64_t>(2 * k, k + 64);
    items_.clear();
    items_.reserve(static_cast<size_t>(std::min(capacity_, num_items)));
    filling_ = k > 0;
    threshold_ = std::numeric_limits<float>::infinity();  // k = 0: nothing passes
  }

  // True until k items are held: then every number is kept (including -inf).
  bool filling() const { return filling_; }

  // The value an item must exceed to be kept (once not filling).
  float threshold() const { return threshold_; }

  // Offers items start .. start + length - 1 with fused values `values` (NaN: not an item);
  // items the cursor excludes are skipped.
  void offer(const float* values, int64_t length, int64_t start, ExclusionCursor& excluded) {
    int64_t i = 0;
    for (; filling_ && i < length; ++i) {
      const float v = values[i];
      if (v == v && !excluded.excludes(start + i)) {
        items_.push_back(pack(v, start + i));
        if (static_cast<int64_t>(items_.size()) == k_) {
          filling_ = false;
          threshold_ = from_ordered_key(~static_cast<uint32_t>(
              *std::max_element(items_.begin(), items_.end()) >> 32));
        }
      }
    }
    // Blocks of 16 items: one vector comparison each, scalar work only for the lanes that pass.
    constexpr int64_t kBlock = 16;
    for (; i + kBlock <= length; i += kBlock) {
#if defined(__AVX2__)
      const __m256 threshold = _mm256_set1_ps(threshold_);
      const __m256 low = _mm256_cmp_ps(_mm256_loadu_ps(values + i), threshold, _CMP_GT_OQ);
      const __m256 high = _mm256_cmp_ps(_mm256_loadu_ps(values + i + 8), threshold, _CMP_GT_OQ);
      uint32_t passed = static_cast<uint32_t>(_mm256_movemask_ps(low)) |
                        (static_cast<uint32_t>(_mm256_movemask_ps(high)) << 8);
      while (passed != 0) {
        const int j = std::countr_zero(passed);
        passed &= passed - 1;
        if (values[i + j] > threshold_ && !excluded.excludes(start + i + j)) {
          insert(values[i + j], start + i + j);  // (the threshold may have risen in this block)
        }
      }
#else
      const float threshold = threshold_;
      int passed = 0;
      for (int64_t j = 0; j < kBlock; ++j) {
        passed += values[i + j] > threshold;
      }
      if (passed != 0) {
        for (int64_t j = 0; j < kBlock; ++j) {
          if (values[i + j] > threshold_ && !excluded.excludes(start + i + j)) {
            insert(values[i + j], start + i + j);
          }
        }
      }
#endif
    }
    for (; i < length; ++i) {
      if (values[i] > threshold_ && !excluded.excludes(start + i)) {
        insert(values[i], start + i);
      }
    }
  }

  // Writes the best min(k, held) items in order, then pads with (-inf, -1) up to k.
  void finish(float* out_values, int64_t* out_indices) {
    const auto kept = std::min<int64_t>(k_, static_cast<int64_t>(items_.size()));
    if (static_cast<int64_t>(items_.size()) > kept) {
      std::nth_element(items_.begin(), items_.begin() + kept, items_.end());
    }
    std::sort(items_.begin(), items_.begin() + kept);
    for (int64_t j = 0; j < kept; ++j) {
      out_values[j] = from_ordered_key(~static_cast<uint32_t>(items_[j] >> 32));
      out_indices[j] = static_cast<int64_t>(items_[j] & 0xffffffffu);
    }
    for (int64_t j = kept; j < k_; ++j) {
      out_values[j] = -std::numeric_limits<float>::infinity();
      out_indices[j] = -1;
    }
  }

 private:
  static uint64_t pack(float value, int64_t index) {
    return (static_cast<uint64_t>(~ordered_key(value)) << 32) | static_cast<uint64_t>(index);
  }

  void insert(float value, int64_t index) {
    items_.push_back(pack(value, index));
    if (static_cast<int64_t>(items_.size()) == capacity_) {
      std::nth_element(items_.begin(), items_.begin() + (k_ - 1), items_.end());
      items_.resize(static_cast<size_t>(k_));
      threshold_ = from_ordered_key(~static_cast<uint32_t>(items_[k_ - 1] >> 32));
    }
  }

  int64_t k_ = 0;
  int64_t capacity_ = 0;
  bool filling_ = false;
  float threshold_ = 0.0f;
  std::vector<uint64_t> items_;
};

}  // namespace mtkernels
