// catalogue_score, CPU: every (user, item) pair's task scores from the factorised first layer of a
// multi-task network (mtkernels.catalogue): the first expert and gate layer is linear in
// x = [user columns | item columns], so its pre-activation is user_part[u] + item_part[n] (the bias
// is in item_part), computed once per user and once per item by the caller. Per block of pairs this
// kernel adds the two parts and applies the experts' ReLU while the block sits in L1/L2, then runs
// what follows exactly as multi_task_score does: deeper expert layers, each task's masked gate
// softmax, the mixture, the tower and its output transform. The [U*N, E*H_1 + T*E] first-layer
// activations exist only per block (about 72 pairs), never in memory as a whole.
//
// The products run on the packed micro-kernel of common/packed_gemm.h. The deeper layers are
// packed per call: they are small (a few hundred KB at most) against a call's U*N pairs.

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "catalogue_score/catalogue_score.h"
#include "common/packed_gemm.h"

namespace mtkernels {
namespace {

// Pairs per block: the block's first-layer activations (72 x ~330 floats for PLE), the deeper
// layers and the tower activations stay in a 512 KB L2.
constexpr int64_t kBlockPairs = 72;

struct CatalogueLayout {
  std::vector<PackedLayer> experts;  // the deeper expert layers H_1 -> H_2 -> ... -> H_L, E groups
  std::vector<PackedLayer> towers;   // the K-1 hidden tower layers, T groups
  int64_t last_weight = 0;           // [T, G_{K-1}]: the 1-wide last tower layer, as dot products
  int64_t last_bias = 0;             // [T]
  int64_t size = 0;
};

CatalogueLayout catalogue_layout(const CatalogueScoreDims& d) {
  CatalogueLayout p;
  int64_t offset = 0;
  auto add = [&](int64_t groups, int64_t n, int64_t k) {
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
  };
  int64_t fan_in = d.first;
  for (int64_t h : d.expert_sizes) {
    p.experts.push_back(add(d.experts, h, fan_in));
    fan_in = h;
  }
  for (size_t k = 0; k + 1 < d.tower_sizes.size(); ++k) {
    p.towers.push_back(add(d.tasks, d.tower_sizes[k], fan_in));
    fan_in = d.tower_sizes[k];
  }
  p.last_weight = offset;
  offset += d.tasks * fan_in;
  p.last_bias = offset;
  offset += d.tasks;
  p.size = offset;
  return p;
}

void pack_catalogue(const CatalogueLayout& p, at::TensorList expert_weights, at::TensorList expert_biases,
                    at::TensorList tower_weights, at::TensorList tower_biases, float* buffer) {
  for (size_t l = 0; l < p.experts.size(); ++l) {
    pack_layer(p.experts[l], expert_weights[l].contiguous().const_data_ptr<float>(),
               expert_biases[l].contiguous().const_data_ptr<float>(), buffer);
  }
  for (size_t k = 0; k < p.towers.size(); ++k) {
    pack_layer(p.towers[k], tower_weights[k].contiguous().const_data_ptr<float>(),
               tower_biases[k].contiguous().const_data_ptr<float>(), buffer);
  }
  const at::Tensor last_w = tower_weights.back().contiguous();  // [T, 1, G]
  const at::Tensor last_b = tower_biases.back().contiguous();   // [T, 1]
  std::memcpy(buffer + p.last_weight, last_w.const_data_ptr<float>(), sizeof(float) * last_w.numel());
  std::memcpy(buffer + p.last_bias, last_b.const_data_ptr<float>(), sizeof(float) * last_b.numel());
}

// out [U*N, T] (pair p = u*N + n) from user [U, C], item [N, C] and the packed deeper layers.
void score_pairs(const float* user, const float* item, const CatalogueScoreDims& d, const CatalogueLayout& p,
                 const float* buffer, const std::vector<uint8_t>& mask, float* out) {
  const int64_t N = d.items, M = d.users * d.items, C = d.width, E = d.experts, T = d.tasks;
  const int64_t expert_columns = E * d.first;
  const size_t L = p.experts.size();  // deeper layers
  const int64_t H = L == 0 ? d.first : p.experts.back().n;  // mixture width
  const int64_t H_pad = L == 0 ? d.first : p.experts.back().n_pad;
  const int64_t G_last = p.towers.empty() ? H : p.towers.back().n;
  // Where expert e's output row r starts: the first-layer buffer for one-layer experts, else the
  // deeper layers' output buffer.
  const int64_t expert_ld = L == 0 ? C : E * H_pad;
  const int64_t expert_stride = L == 0 ? d.first : H_pad;
  std::vector<int64_t> single(T, -1);  // the one allowed expert of a task, or -1 (a real mixture)
  for (int64_t t = 0; t < T; ++t) {
    int64_t count = 0, last = -1;
    for (int64_t e = 0; e < E; ++e)
      if (mask[t * E + e]) ++count, last = e;
    if (count == 1) single[t] = last;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t num_blocks = (M + kBlockPairs - 1) / kBlockPairs;
  // At least two blocks per thread where the pairs allow, so a descheduled thread's work is taken.
  if (num_blocks < 2 * threads) num_blocks = std::min<int64_t>(M, 2 * threads);
  const int64_t even = (M + num_blocks - 1) / num_blocks;
  const int64_t block = even >= kTileRows ? round_up(even, kTileRows) : std::max<int64_t>(1, even);
  num_blocks = (M + block - 1) / block;
  int64_t hidden_pad = 0;  // widest deeper expert layer but the last, padded
  for (size_t l = 0; l + 1 < L; ++l) hidden_pad = std::max(hidden_pad, p.experts[l].n_pad);
  int64_t tower_pad = 0;
  for (const PackedLayer& l : p.towers) tower_pad = std::max(tower_pad, l.n_pad);
  const float* last_w = buffer + p.last_weight;
  const float* last_b = buffer + p.last_bias;

  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min(threads, num_blocks), 1, [&](int64_t, int64_t) {
    std::vector<float> first(static_cast<size_t>(block * C));
    std::vector<float> hidden[2];
    for (auto& h : hidden) h.resize(static_cast<size_t>(block * hidden_pad));
    std::vector<float> expert_out(L == 0 ? 0 : static_cast<size_t>(block * E * H_pad));
    std::vector<float> gate(static_cast<size_t>(block * E));
    std::vector<float> mix(static_cast<size_t>(block * H_pad));
    std::vector<float> tower[2];
    for (auto& h : tower) h.resize(static_cast<size_t>(block * tower_pad));

    for (int64_t blk = next_block.fetch_add(1); blk < num_blocks; blk = next_block.fetch_add(1)) {
      const int64_t r0 = blk * block;
      const int64_t nb = std::min(block, M - r0);
      // The first layer: user part + item part, ReLU on the expert columns (not the gate logits).
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t pair = r0 + r;
        const float* a = user + (pair / N) * C;
        const float* b = item + (pair % N) * C;
        float* f = first.data() + r * C;
        for (int64_t j = 0; j < expert_columns; ++j) f[j] = std::max(a[j] + b[j], 0.f);
        for (int64_t j = expert_columns; j < C; ++j) f[j] = a[j] + b[j];
      }
      const float* experts = first.data();
      if (L > 0) {
        for (int64_t e = 0; e < E; ++e) {
          const float* in = first.data() + e * d.first;
          int64_t in_ld = C;
          for (size_t l = 0; l < L; ++l) {
            const bool last = l + 1 == L;
            float* dst = last ? expert_out.data() + e * H_pad : hidden[l % 2].data();
            const int64_t dst_ld = last ? expert_ld : p.experts[l].n_pad;
            small_gemm(nb, p.experts[l], e, buffer, in, in_ld, /*relu=*/true, dst, dst_ld);
            in = dst;
            in_ld = dst_ld;
          }
        }
        experts = expert_out.data();
      }

      for (int64_t t = 0; t < T; ++t) {
        const float* in;
        int64_t in_ld;
        if (single[t] >= 0) {  // softmax over one expert: weight 1, the mixture is that expert
          in = experts + single[t] * expert_stride;
          in_ld = expert_ld;
        } else {
          const uint8_t* allowed = mask.data() + t * E;
          for (int64_t r = 0; r < nb; ++r) {
            const float* logits = first.data() + r * C + expert_columns + t * E;
            float* g = gate.data() + r * E;
            float max_logit = -std::numeric_limits<float>::infinity();
            for (int64_t e = 0; e < E; ++e)
              if (allowed[e] && logits[e] > max_logit) max_logit = logits[e];
            float sum = 0.f;
            for (int64_t e = 0; e < E; ++e) {
              g[e] = allowed[e] ? std::exp(logits[e] - max_logit) : 0.f;
              sum += g[e];
            }
            const float inv = 1.f / sum;
            const float* er = experts + r * expert_ld;
            float* m = mix.data() + r * H_pad;
            std::fill(m, m + H, 0.f);
            for (int64_t e = 0; e < E; ++e) {
              if (!allowed[e]) continue;
              const float ge = g[e] * inv;
              const float* src = er + e * expert_stride;
              for (int64_t j = 0; j < H; ++j) m[j] += ge * src[j];
            }
          }
          in = mix.data();
          in_ld = H_pad;
        }
        for (size_t k = 0; k < p.towers.size(); ++k) {
          float* dst = tower[k % 2].data();
          small_gemm(nb, p.towers[k], t, buffer, in, in_ld, /*relu=*/true, dst, p.towers[k].n_pad);
          in = dst;
          in_ld = p.towers[k].n_pad;
        }
        const float* wl = last_w + t * G_last;
        const float bl = last_b[t];
        const bool sigmoid = d.sigmoid[t];
        for (int64_t r = 0; r < nb; ++r) {
          const float* row = in + r * in_ld;
          float s = 0.f;
          for (int64_t j = 0; j < G_last; ++j) s += row[j] * wl[j];
          s += bl;
          out[(r0 + r) * T + t] = sigmoid ? 1.f / (1.f + std::exp(-s)) : s;
        }
      }
    }
  });
}

at::Tensor catalogue_score_cpu(const at::Tensor& user_part, const at::Tensor& item_part,
                               at::TensorList expert_weights, at::TensorList expert_biases,
                               const at::Tensor& gate_mask, at::TensorList tower_weights,
                               at::TensorList tower_biases, std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only: no autograd inside
  const CatalogueScoreDims d = check_catalogue_score_inputs(user_part, item_part, expert_weights, expert_biases,
                                                            gate_mask, tower_weights, tower_biases, transforms);
  const at::Tensor mask_t = gate_mask.contiguous();
  const bool* mask_ptr = mask_t.const_data_ptr<bool>();
  std::vector<uint8_t> mask(static_cast<size_t>(d.tasks * d.experts));
  for (int64_t t = 0; t < d.tasks; ++t) {
    bool any = false;
    for (int64_t e = 0; e < d.experts; ++e) {
      mask[t * d.experts + e] = mask_ptr[t * d.experts + e] ? 1 : 0;
      any = any || mask_ptr[t * d.experts + e];
    }
    TORCH_CHECK_VALUE(any, "params.gate_mask must allow at least one expert for every task (row ", t, ")");
  }
  at::Tensor out = at::empty({d.users, d.items, d.tasks}, user_part.options());
  if (out.numel() == 0) return out;
  const CatalogueLayout p = catalogue_layout(d);
  at::Tensor buffer = at::empty({p.size}, user_part.options());
  pack_catalogue(p, expert_weights, expert_biases, tower_weights, tower_biases, buffer.data_ptr<float>());
  const at::Tensor user = user_part.contiguous(), item = item_part.contiguous();
  score_pairs(user.const_data_ptr<float>(), item.const_data_ptr<float>(), d, p, buffer.const_data_ptr<float>(),
              mask, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) { m.impl("catalogue_score", &catalogue_score_cpu); }

}  // namespace mtkernels
