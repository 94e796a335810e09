// The register-tiled micro-kernel of the native scoring ops (multi_task_score, catalogue_score):
// weights packed into 16-column panels (the BLIS / GotoBLAS layout: Goto & van de Geijn, "Anatomy
// of High-Performance Matrix Multiplication", TOMS 2008) and one 6-row x 16-column tile kernel
// (12 AVX2 accumulators) that fuses bias and ReLU into its store. CPU only, float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mtkernels {

// 8 floats: GCC/Clang vector extension, AVX2 with -march=native, SSE pairs or scalar otherwise.
// Accumulators use the naturally aligned type (kept in registers); loads and stores go through
// the 4-byte-aligned alias (unaligned moves) since rows and panels need not be 32-byte aligned.
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kPanel = 16;    // columns per packed weight panel (two vec8)
constexpr int64_t kTileRows = 6;  // rows per micro-kernel tile: 12 accumulators + 3 in 16 registers
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

inline vec8 load8(const float* p) { return *reinterpret_cast<const vec8_unaligned*>(p); }
inline void store8(float* p, vec8 v) { *reinterpret_cast<vec8_unaligned*>(p) = v; }

// One packed dense layer of G groups (experts or tasks): offsets, in floats, into the buffer.
struct PackedLayer {
  int64_t groups = 0, n = 0, k = 0, n_pad = 0;
  int64_t panels = 0;  // [G][n_pad / 16][k][16]: group g's weight [n, k] as 16-column panels
  int64_t bias = 0;    // [G][n_pad], zero-padded
};

// Weights W [n, k] (nn.Linear layout) -> panels [ceil(n/16)][k][16], zero-padded columns, so the
// micro-kernel reads 16 consecutive output columns for each k.
inline void pack_panels(const float* w, int64_t n, int64_t k, float* out) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = out + p * k * kPanel;
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t j = 0; j < cols; ++j) dst[kk * kPanel + j] = w[(p * kPanel + j) * k + kk];
      for (int64_t j = cols; j < kPanel; ++j) dst[kk * kPanel + j] = 0.f;
    }
  }
}

// weight [G, n, k] and bias [G, n], float32 contiguous.
inline void pack_layer(const PackedLayer& l, const float* weight, const float* bias, float* buffer) {
  for (int64_t g = 0; g < l.groups; ++g) {
    pack_panels(weight + g * l.n * l.k, l.n, l.k, buffer + l.panels + g * l.n_pad * l.k);
    float* b = buffer + l.bias + g * l.n_pad;
    std::memcpy(b, bias + g * l.n, sizeof(float) * l.n);
    std::fill(b + l.n, b + l.n_pad, 0.f);
  }
}

// C[ROWS, 16] = relu?(A[ROWS, K] B_panel[K, 16] + bias[16]). Writes all 16 columns: every
// destination buffer here is padded to a multiple of 16 columns.
template <int ROWS>
inline void tile_kernel(int64_t k, const float* a, int64_t lda, const float* panel, const float* bias,
                        bool relu, float* c, int64_t ldc) {
  vec8 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = vec8{};
  for (int64_t kk = 0; kk < k; ++kk) {
    const vec8 b0 = load8(panel + kk * kPanel);
    const vec8 b1 = load8(panel + kk * kPanel + 8);
    for (int r = 0; r < ROWS; ++r) {
      const float s = a[r * lda + kk];
      acc[r][0] += s * b0;
      acc[r][1] += s * b1;
    }
  }
  const vec8 bias0 = load8(bias), bias1 = load8(bias + 8);
  const vec8 zero = vec8{};
  for (int r = 0; r < ROWS; ++r) {
    vec8 v0 = acc[r][0] + bias0, v1 = acc[r][1] + bias1;
    if (relu) {
      v0 = v0 > zero ? v0 : zero;
      v1 = v1 > zero ? v1 : zero;
    }
    store8(c + r * ldc, v0);
    store8(c + r * ldc + 8, v1);
  }
}

// C[rows, n_pad] = relu?(A[rows, K] W^T + bias) for one packed group. Loops panel-outer so one
// 16-column panel (K x 64 bytes) stays in L1 while the row tiles stream over it from L2.
inline void small_gemm(int64_t rows, const PackedLayer& l, int64_t group, const float* buffer, const float* a,
                       int64_t lda, bool relu, float* c, int64_t ldc) {
  const int64_t k = l.k;
  const float* packed = buffer + l.panels + group * l.n_pad * k;
  const float* bias = buffer + l.bias + group * l.n_pad;
  for (int64_t p = 0; p < l.n_pad / kPanel; ++p) {
    const float* panel = packed + p * k * kPanel;
    const float* bp = bias + p * kPanel;
    float* cp = c + p * kPanel;
    int64_t r = 0;
    for (; r + kTileRows <= rows; r += kTileRows)
      tile_kernel<kTileRows>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc);
    if (r < rows && rows >= kTileRows) {
      // The remainder as one more full tile ending at the last row: it recomputes (and rewrites
      // with the same values) up to 5 rows, where a 1- or 2-row tile would be bound by the FMA
      // latency at a quarter of the rate. C never aliases A here.
      r = rows - kTileRows;
      tile_kernel<kTileRows>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc);
      continue;
    }
    switch (rows - r) {
      case 5: tile_kernel<5>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc); break;
      case 4: tile_kernel<4>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc); break;
      case 3: tile_kernel<3>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc); break;
      case 2: tile_kernel<2>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc); break;
      case 1: tile_kernel<1>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc); break;
      default: break;
    }
  }
}

inline at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

}  // namespace mtkernels
