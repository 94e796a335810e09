// The register-tiled micro-kernel of the native scoring ops (multi_task_score, catalogue_score):
// weights packed into 16-column panels (the BLIS / GotoBLAS layout: Goto & van de Geijn, "Anatomy
// of High-Performance Matrix Multiplication", TOMS 2008) and one 6-row x 16-column tile kernel
// (12 AVX2 accumulators) that fuses bias and ReLU into its store; the buffer layout of packed experts
// and towers; and the per-block steps both ops share (expert layers, masked gate softmax, mixture,
// towers and output transform). CPU only, float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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
    if (relu) {  // "not <= 0" keeps NaN, as torch.relu does
      v0 = v0 <= zero ? zero : v0;
      v1 = v1 <= zero ? zero : v1;
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

// Lays packed layers out one after another in one float32 buffer; `offset` ends as its size.
struct LayoutBuilder {
  int64_t offset = 0;
  PackedLayer add(int64_t groups, int64_t n, int64_t k) {
    PackedLayer l;
    l.groups = groups;
    l.n = n;
    l.k = k;
    l.n_pad = round_up(n, kPanel);
    l.panels = offset;
    offset += groups * l.n_pad * k;
    l.bias = offset;
    offset += groups * l.n_pad;
    return l;
  }
  // A stack of grouped layers of widths `sizes`, the first reading `fan_in` columns; on return
  // fan_in is the last layer's width.
  std::vector<PackedLayer> add_stack(int64_t groups, const std::vector<int64_t>& sizes, int64_t& fan_in) {
    std::vector<PackedLayer> layers;
    for (int64_t n : sizes) {
      layers.push_back(add(groups, n, fan_in));
      fan_in = n;
    }
    return layers;
  }
};

// weights[l] [G, n_l, k_l] and biases[l] [G, n_l] of the first layers.size() entries, any float dtype.
inline void pack_stack(const std::vector<PackedLayer>& layers, at::TensorList weights, at::TensorList biases,
                       float* buffer) {
  for (size_t l = 0; l < layers.size(); ++l) {
    pack_layer(layers[l], as_float(weights[l]).const_data_ptr<float>(), as_float(biases[l]).const_data_ptr<float>(),
               buffer);
  }
}

// The T task towers G_1 .. G_K (G_K = 1): the K-1 hidden layers packed, the 1-wide last layer kept
// as [T, G_{K-1}] rows for dot products, then its [T] biases.
struct PackedTowers {
  std::vector<PackedLayer> hidden;
  int64_t last_weight = 0;
  int64_t last_bias = 0;
};

inline PackedTowers add_towers(LayoutBuilder& b, int64_t tasks, const std::vector<int64_t>& tower_sizes,
                               int64_t fan_in) {
  PackedTowers t;
  t.hidden = b.add_stack(tasks, std::vector<int64_t>(tower_sizes.begin(), tower_sizes.end() - 1), fan_in);
  t.last_weight = b.offset;
  b.offset += tasks * fan_in;
  t.last_bias = b.offset;
  b.offset += tasks;
  return t;
}

// tower_weights[k] [T, G_k, G_{k-1}], tower_biases[k] [T, G_k], any float dtype.
inline void pack_towers(const PackedTowers& t, at::TensorList tower_weights, at::TensorList tower_biases,
                        float* buffer) {
  pack_stack(t.hidden, tower_weights, tower_biases, buffer);
  const at::Tensor last_w = as_float(tower_weights.back());  // [T, 1, G]
  const at::Tensor last_b = as_float(tower_biases.back());   // [T, 1]
  std::memcpy(buffer + t.last_weight, last_w.const_data_ptr<float>(), sizeof(float) * last_w.numel());
  std::memcpy(buffer + t.last_bias, last_b.const_data_ptr<float>(), sizeof(float) * last_b.numel());
}

// The widest padded width among `layers` (0 if none): the size of a ping-pong scratch row.
inline int64_t widest_padded(const std::vector<PackedLayer>& layers, size_t count) {
  int64_t w = 0;
  for (size_t l = 0; l < count && l < layers.size(); ++l) w = std::max(w, layers[l].n_pad);
  return w;
}

// Every expert's layers on a block of nb rows: expert e reads in + e * in_stride (leading dimension
// in_ld), its hidden layers ping-pong through hidden[2] (nb x widest_padded(layers, L-1)) and its
// last layer lands at out + e * out_stride (leading dimension out_ld). Bias + ReLU after every layer.
inline void expert_layers(int64_t nb, const std::vector<PackedLayer>& layers, int64_t experts, const float* buffer,
                          const float* in0, int64_t in_ld, int64_t in_stride, std::vector<float> (&hidden)[2],
                          float* out, int64_t out_ld, int64_t out_stride) {
  for (int64_t e = 0; e < experts; ++e) {
    const float* in = in0 + e * in_stride;
    int64_t ld = in_ld;
    for (size_t l = 0; l < layers.size(); ++l) {
      const bool last = l + 1 == layers.size();
      float* dst = last ? out + e * out_stride : hidden[l % 2].data();
      const int64_t dst_ld = last ? out_ld : layers[l].n_pad;
      small_gemm(nb, layers[l], e, buffer, in, ld, /*relu=*/true, dst, dst_ld);
      in = dst;
      ld = dst_ld;
    }
  }
}

// Task t's tower on its mixture rows in [nb, in_ld]: the hidden layers on the micro-kernel (ping-pong
// through scratch[2], nb x widest_padded(towers.hidden)), the 1-wide last layer as dot products over
// its G_last inputs, then the output transform; writes out[r * out_ld].
inline void tower_scores(int64_t nb, const PackedTowers& towers, int64_t t, int64_t G_last, bool sigmoid,
                         const float* buffer, const float* in, int64_t in_ld, std::vector<float> (&scratch)[2],
                         float* out, int64_t out_ld) {
  for (size_t k = 0; k < towers.hidden.size(); ++k) {
    float* dst = scratch[k % 2].data();
    small_gemm(nb, towers.hidden[k], t, buffer, in, in_ld, /*relu=*/true, dst, towers.hidden[k].n_pad);
    in = dst;
    in_ld = towers.hidden[k].n_pad;
  }
  const float* wl = buffer + towers.last_weight + t * G_last;
  const float bl = buffer[towers.last_bias + t];
  for (int64_t r = 0; r < nb; ++r) {
    const float* row = in + r * in_ld;
    float s = 0.f;
    for (int64_t j = 0; j < G_last; ++j) s += row[j] * wl[j];
    s += bl;
    out[r * out_ld] = sigmoid ? 1.f / (1.f + std::exp(-s)) : s;
  }
}

// In place: g[e] = softmax over the allowed experts of the logits g[0..E), 0 elsewhere.
inline void masked_softmax(float* g, const uint8_t* allowed, int64_t experts) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < experts; ++e)
    if (allowed[e] && g[e] > max_logit) max_logit = g[e];
  float sum = 0.f;
  for (int64_t e = 0; e < experts; ++e) {
    g[e] = allowed[e] ? std::exp(g[e] - max_logit) : 0.f;
    sum += g[e];
  }
  const float inv = 1.f / sum;
  for (int64_t e = 0; e < experts; ++e) g[e] *= inv;
}

// m[0..H) = sum over allowed experts of g[e] * (experts + e * stride)[0..H).
inline void mix_experts(float* m, const float* g, const uint8_t* allowed, const float* experts, int64_t num_experts,
                        int64_t stride, int64_t H) {
  std::fill(m, m + H, 0.f);
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!allowed[e]) continue;
    const float ge = g[e];
    const float* src = experts + e * stride;
    for (int64_t j = 0; j < H; ++j) m[j] += ge * src[j];
  }
}

// gate_mask [T, E] bool -> bytes, each task allowing at least one expert.
inline std::vector<uint8_t> gate_mask_bytes(const at::Tensor& gate_mask) {
  const at::Tensor m = gate_mask.contiguous();
  const int64_t T = m.size(0), E = m.size(1);
  const bool* ptr = m.const_data_ptr<bool>();
  std::vector<uint8_t> mask(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int64_t e = 0; e < E; ++e) {
      mask[t * E + e] = ptr[t * E + e] ? 1 : 0;
      any = any || ptr[t * E + e];
    }
    TORCH_CHECK_VALUE(any, "params.gate_mask must allow at least one expert for every task (row ", t, ")");
  }
  return mask;
}

}  // namespace mtkernels
