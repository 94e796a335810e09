// multi_task_score, CPU: experts, per-task softmax gates, task towers and output transforms
// (ARCHITECTURE §3.2), float32 arithmetic throughout (bfloat16/float16 inputs are widened once).
//
//   1. One ATen product x [M, D] x [D, E*H_1 + T*E] gives every expert's first layer and every
//      gate's logits at once (the packer stores the gate rows right after the expert first-layer
//      rows; other layouts are concatenated once per call). It is the bulk of the FLOPs and
//      MKL's full-size product runs it faster than per-block calls. Serving-sized calls (up to
//      256 rows per thread) instead make it per block inside the parallel region below, so the
//      whole call is one fork/join.
//   2. One at::parallel_for over blocks of rows does the rest with the block's activations in
//      L1/L2: bias + ReLU, the masked gate softmax, the remaining expert layers, the per-task
//      mixtures, the towers and the transforms. Its matrix products are small (e.g. [B,128] x
//      [128,64] per expert) where a BLAS call costs more in overhead and packing than it computes,
//      so they run on a register-tiled micro-kernel over weights packed once per call into
//      16-column panels (the BLIS / GotoBLAS layout: Goto & van de Geijn, "Anatomy of
//      High-Performance Matrix Multiplication", TOMS 2008), with bias and ReLU fused into the
//      store. The [M, T, H] mixtures and later expert layers exist only per block.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "multi_task_score/multi_task_score.h"

namespace mtkernels {
namespace {

// 8 floats: GCC/Clang vector extension, AVX2 with -march=native, SSE pairs or scalar otherwise.
// Accumulators use the naturally aligned type (kept in registers); loads and stores go through
// the 4-byte-aligned alias (unaligned moves) since rows and panels need not be 32-byte aligned.
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kPanel = 16;  // columns per packed weight panel (two vec8)
constexpr int64_t kTileRows = 6;  // rows per micro-kernel tile: 12 accumulators + 3 in 16 registers
constexpr int64_t kBlockRows = 96;  // rows per block of the streaming pass (large calls)
constexpr int64_t kOnePassRows = 256;  // up to this many rows per thread: one block per thread

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

inline vec8 load8(const float* p) { return *reinterpret_cast<const vec8_unaligned*>(p); }
inline void store8(float* p, vec8 v) { *reinterpret_cast<vec8_unaligned*>(p) = v; }

// Weights W [N, K] (nn.Linear layout) -> panels [ceil(N/16)][K][16], zero-padded columns, so the
// micro-kernel reads 16 consecutive output columns for each k.
void pack_panels(const float* w, int64_t n, int64_t k, float* out) {
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

// C[rows, N] = relu?(A[rows, K] W^T + bias) with W packed by pack_panels and bias padded to
// round_up(N, 16). Loops panel-outer so one 16-column panel (K x 64 bytes) stays in L1 while the
// row tiles stream over it.
void small_gemm(int64_t rows, int64_t n, int64_t k, const float* a, int64_t lda, const float* packed,
                const float* bias, bool relu, float* c, int64_t ldc) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = packed + p * k * kPanel;
    const float* bp = bias + p * kPanel;
    float* cp = c + p * kPanel;
    int64_t r = 0;
    for (; r + kTileRows <= rows; r += kTileRows)
      tile_kernel<kTileRows>(k, a + r * lda, lda, panel, bp, relu, cp + r * ldc, ldc);
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

// One dense layer stack, packed: per group g (expert or task), layer l's panels and padded bias.
struct PackedLayers {
  std::vector<int64_t> in, out;         // K and N per layer
  std::vector<at::Tensor> panels, bias;  // per layer: [G, panels*K*16], [G, round_up(N, 16)]
  int64_t panel_stride(size_t l) const { return round_up(out[l], kPanel) * in[l]; }
};

PackedLayers pack_layers(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                         size_t first, size_t last) {
  PackedLayers packed;
  for (size_t l = first; l < last; ++l) {
    const at::Tensor& w = weights[l];  // [G, N, K], float32 contiguous
    const int64_t groups = w.size(0), n = w.size(1), k = w.size(2);
    const int64_t stride = round_up(n, kPanel) * k;
    at::Tensor panels = at::empty({groups, stride}, w.options());
    at::Tensor bias = at::zeros({groups, round_up(n, kPanel)}, w.options());
    const float* wp = w.const_data_ptr<float>();
    const float* bp = biases[l].const_data_ptr<float>();
    float* pp = panels.data_ptr<float>();
    float* biasp = bias.data_ptr<float>();
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        pack_panels(wp + g * n * k, n, k, pp + g * stride);
        std::memcpy(biasp + g * round_up(n, kPanel), bp + g * n, sizeof(float) * n);
      }
    });
    packed.in.push_back(k);
    packed.out.push_back(n);
    packed.panels.push_back(panels);
    packed.bias.push_back(bias);
  }
  return packed;
}

// True when `second` starts right where `first` ends in one buffer: the two read as one matrix.
bool adjacent(const at::Tensor& first, const at::Tensor& second) {
  return first.is_contiguous() && second.is_contiguous() && first.numel() > 0 &&
         first.scalar_type() == second.scalar_type() && first.storage().is_alias_of(second.storage()) &&
         static_cast<const char*>(first.const_data_ptr()) + first.nbytes() ==
             static_cast<const char*>(second.const_data_ptr());
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

at::Tensor multi_task_score_cpu(const at::Tensor& x_in, at::TensorList expert_weights_in,
                                at::TensorList expert_biases_in, const at::Tensor& gate_weight,
                                const at::Tensor& gate_bias, const at::Tensor& gate_mask,
                                at::TensorList tower_weights_in, at::TensorList tower_biases_in,
                                std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only: no autograd inside
  const MultiTaskScoreDims d =
      check_multi_task_score_inputs(x_in, expert_weights_in, expert_biases_in, gate_weight, gate_bias,
                                    gate_mask, tower_weights_in, tower_biases_in, transforms);
  TORCH_CHECK_TYPE(x_in.scalar_type() != at::kDouble,
                   "x: the native multi_task_score computes in float32; float64 input runs on "
                   "mtkernels.reference.multi_task_score (mtkernels.ops.multi_task_score routes it there)");
  const int64_t M = d.rows, E = d.experts, T = d.tasks, D = d.width, H1 = d.expert_sizes[0];
  const int64_t N1 = E * H1 + T * E;

  const at::Tensor mask_t = gate_mask.contiguous();
  const bool* mask_ptr = mask_t.const_data_ptr<bool>();
  std::vector<uint8_t> mask(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int64_t e = 0; e < E; ++e) {
      mask[t * E + e] = mask_ptr[t * E + e] ? 1 : 0;
      any = any || mask_ptr[t * E + e];
    }
    TORCH_CHECK_VALUE(any, "params.gate_mask must allow at least one expert for every task");
  }
  at::Tensor out = at::empty({M, T}, x_in.options());
  if (M == 0) return out;

  // The expert first layers and the gates as one [E*H_1 + T*E, D] matrix (and one bias vector):
  // free when the params come from pack_multi_task_params, one copy otherwise.
  const at::Tensor& w0 = expert_weights_in[0];
  const at::Tensor& b0 = expert_biases_in[0];
  at::Tensor first_weight = adjacent(w0, gate_weight)
                                ? at::Tensor(w0).as_strided({N1, D}, {D, 1})
                                : at::cat({w0.reshape({E * H1, D}), gate_weight.reshape({T * E, D})});
  at::Tensor first_bias = adjacent(b0, gate_bias) ? at::Tensor(b0).as_strided({N1}, {1})
                                                  : at::cat({b0.reshape({E * H1}), gate_bias.reshape({T * E})});
  first_weight = as_float(first_weight);
  first_bias = as_float(first_bias);
  const at::Tensor x = as_float(x_in);

  std::vector<at::Tensor> expert_weights, expert_biases, tower_weights, tower_biases;
  for (size_t l = 0; l < expert_weights_in.size(); ++l) {
    // layer 0 is read through first_weight / first_bias
    expert_weights.push_back(l == 0 ? at::Tensor() : as_float(expert_weights_in[l]));
    expert_biases.push_back(l == 0 ? at::Tensor() : as_float(expert_biases_in[l]));
  }
  for (size_t k = 0; k < tower_weights_in.size(); ++k) {
    tower_weights.push_back(as_float(tower_weights_in[k]));
    tower_biases.push_back(as_float(tower_biases_in[k]));
  }
  const size_t num_expert_layers = expert_weights.size(), num_tower_layers = tower_weights.size();
  const PackedLayers experts = pack_layers(expert_weights, expert_biases, 1, num_expert_layers);
  const PackedLayers towers = pack_layers(tower_weights, tower_biases, 0, num_tower_layers - 1);

  const int64_t H = d.expert_sizes.back();  // mixture width
  const int64_t G_last = num_tower_layers > 1 ? d.tower_sizes[num_tower_layers - 2] : H;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_per_thread = round_up((M + threads - 1) / threads, kTileRows);
  // Serving-sized calls (a few hundred rows) are overhead-bound: one block per thread, the first
  // product made per block inside the single parallel region (no second fork/join, no
  // [M, N1] buffer). Larger calls make the first product once, full size, where MKL is fastest,
  // and then stream blocks of rows small enough that the later activations stay in L2.
  const bool one_pass = rows_per_thread <= kOnePassRows;
  const int64_t block = one_pass ? rows_per_thread : std::min<int64_t>(kBlockRows, rows_per_thread);
  const int64_t num_blocks = (M + block - 1) / block;

  // 1. Every expert's first layer and every gate's logits, one product (bias added below).
  at::Tensor first;  // [M, N1], made here and updated in place below
  if (!one_pass) first = at::mm(x, first_weight.t());
  const at::Tensor first_t = first_weight.t();
  const int64_t first_ld = N1;

  float* first_p = one_pass ? nullptr : first.data_ptr<float>();
  const float* b1 = first_bias.const_data_ptr<float>();
  const float* last_w = tower_weights.back().const_data_ptr<float>();  // [T, 1, G_last]
  const float* last_b = tower_biases.back().const_data_ptr<float>();   // [T, 1]
  at::Tensor out_f = x_in.scalar_type() == at::kFloat ? out : at::empty({M, T}, x.options());
  float* out_p = out_f.data_ptr<float>();

  // Blocks are claimed dynamically: on a shared machine a thread that was descheduled finds the
  // work already taken by the others instead of making them wait at the join.
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min(threads, num_blocks), 1, [&](int64_t, int64_t) {
    // Dispatch state is thread-local and OpenMP workers do not inherit it.
    at::AutoDispatchBelowADInplaceOrView below_autograd_worker;
    at::Tensor block_first_buf = one_pass ? at::empty({block, N1}, x.options()) : at::Tensor();
    // Per-thread scratch, reused by every block of this thread. Widths padded to 16 columns.
    std::vector<std::vector<float>> layer_buf(num_expert_layers);  // [0]: unused, rows of `first`
    std::vector<int64_t> layer_ld(num_expert_layers);
    layer_ld[0] = N1;
    for (size_t l = 1; l < num_expert_layers; ++l) {
      layer_ld[l] = E * round_up(d.expert_sizes[l], kPanel);
      layer_buf[l].resize(static_cast<size_t>(block * layer_ld[l]));
    }
    const int64_t mix_ld = round_up(H, kPanel);
    std::vector<float> mix(static_cast<size_t>(block * mix_ld));
    std::vector<std::vector<float>> tower_buf(num_tower_layers);
    for (size_t k = 0; k + 1 < num_tower_layers; ++k)
      tower_buf[k].resize(static_cast<size_t>(block * round_up(d.tower_sizes[k], kPanel)));
    std::vector<float> gate(static_cast<size_t>(block * T * E));

    for (int64_t blk = next_block.fetch_add(1); blk < num_blocks; blk = next_block.fetch_add(1)) {
      const int64_t r0 = blk * block;
      const int64_t nb = std::min(block, M - r0);

      float* block_first;
      if (one_pass) {
        at::Tensor rows = block_first_buf.narrow(0, 0, nb);
        at::mm_out(rows, x.narrow(0, r0, nb), first_t);  // one thread's product, inside the region
        block_first = rows.data_ptr<float>();
      } else {
        block_first = first_p + r0 * first_ld;
      }
      // bias + ReLU of the expert first layers, in place, and the masked gate softmax.
      for (int64_t r = 0; r < nb; ++r) {
        float* src = block_first + r * N1;
        for (int64_t j = 0; j < E * H1; ++j) {
          const float v = src[j] + b1[j];
          src[j] = v > 0.f ? v : 0.f;
        }
        for (int64_t t = 0; t < T; ++t) {
          const float* logit = src + E * H1 + t * E;
          const float* bias = b1 + E * H1 + t * E;
          const uint8_t* allowed = mask.data() + t * E;
          float* g = gate.data() + (r * T + t) * E;
          float max_logit = -std::numeric_limits<float>::infinity();
          for (int64_t e = 0; e < E; ++e) {
            g[e] = logit[e] + bias[e];
            if (allowed[e] && g[e] > max_logit) max_logit = g[e];
          }
          float sum = 0.f;
          for (int64_t e = 0; e < E; ++e) {
            g[e] = allowed[e] ? std::exp(g[e] - max_logit) : 0.f;
            sum += g[e];
          }
          const float inv = 1.f / sum;
          for (int64_t e = 0; e < E; ++e) g[e] *= inv;
        }
      }

      // remaining expert layers, per expert on the block (bias + ReLU fused into the store).
      for (size_t l = 1; l < num_expert_layers; ++l) {
        const int64_t in_w = d.expert_sizes[l - 1], out_w = d.expert_sizes[l];
        const int64_t in_step = l == 1 ? in_w : round_up(in_w, kPanel);
        const int64_t out_step = round_up(out_w, kPanel);
        const float* panels = experts.panels[l - 1].const_data_ptr<float>();
        const float* bias = experts.bias[l - 1].const_data_ptr<float>();
        for (int64_t e = 0; e < E; ++e) {
          const float* in = l == 1 ? block_first : layer_buf[l - 1].data();
          small_gemm(nb, out_w, in_w, in + e * in_step, layer_ld[l - 1],
                     panels + e * experts.panel_stride(l - 1), bias + e * out_step, /*relu=*/true,
                     layer_buf[l].data() + e * out_step, layer_ld[l]);
        }
      }
      const float* last = num_expert_layers == 1 ? block_first : layer_buf[num_expert_layers - 1].data();
      const int64_t last_ld = layer_ld[num_expert_layers - 1];
      const int64_t last_step = num_expert_layers == 1 ? H : round_up(H, kPanel);

      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* allowed = mask.data() + t * E;
        // mixture_t = sum over allowed experts of gate weight x expert output, per row.
        for (int64_t r = 0; r < nb; ++r) {
          const float* g = gate.data() + (r * T + t) * E;
          const float* er = last + r * last_ld;
          float* m = mix.data() + r * mix_ld;
          std::fill(m, m + H, 0.f);
          for (int64_t e = 0; e < E; ++e) {
            if (!allowed[e]) continue;
            const float ge = g[e];
            const float* src = er + e * last_step;
            for (int64_t j = 0; j < H; ++j) m[j] += ge * src[j];
          }
        }
        // tower: hidden layers on the micro-kernel, the 1-wide last layer as a dot product.
        const float* in = mix.data();
        int64_t in_ld = mix_ld;
        for (size_t k = 0; k + 1 < num_tower_layers; ++k) {
          const int64_t out_w = d.tower_sizes[k];
          const int64_t ld = round_up(out_w, kPanel);
          small_gemm(nb, out_w, towers.in[k], in, in_ld, towers.panels[k].const_data_ptr<float>() + t * towers.panel_stride(k),
                     towers.bias[k].const_data_ptr<float>() + t * ld, /*relu=*/true, tower_buf[k].data(), ld);
          in = tower_buf[k].data();
          in_ld = ld;
        }
        const float* wl = last_w + t * G_last;
        const float bl = last_b[t];
        const bool sigmoid = d.sigmoid[t];
        for (int64_t r = 0; r < nb; ++r) {
          const float* row = in + r * in_ld;
          float s = 0.f;
          for (int64_t j = 0; j < G_last; ++j) s += row[j] * wl[j];
          s += bl;
          out_p[(r0 + r) * T + t] = sigmoid ? 1.f / (1.f + std::exp(-s)) : s;
        }
      }
    }
  });
  if (!out_f.is_same(out)) out.copy_(out_f);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("multi_task_score", &multi_task_score_cpu);
}

}  // namespace mtkernels
