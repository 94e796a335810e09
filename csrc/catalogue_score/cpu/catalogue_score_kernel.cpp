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
  PackedTowers towers;               // T groups
  int64_t size = 0;
};

CatalogueLayout catalogue_layout(const CatalogueScoreDims& d) {
  CatalogueLayout p;
  LayoutBuilder b;
  int64_t fan_in = d.first;
  p.experts = b.add_stack(d.experts, d.expert_sizes, fan_in);
  p.towers = add_towers(b, d.tasks, d.tower_sizes, fan_in);
  p.size = b.offset;
  return p;
}

void pack_catalogue(const CatalogueLayout& p, at::TensorList expert_weights, at::TensorList expert_biases,
                    at::TensorList tower_weights, at::TensorList tower_biases, float* buffer) {
  pack_stack(p.experts, expert_weights, expert_biases, buffer);
  pack_towers(p.towers, tower_weights, tower_biases, buffer);
}

// out [U*N, T] (pair p = u*N + n) from user [U, C], item [N, C] and the packed deeper layers.
void score_pairs(const float* user, const float* item, const CatalogueScoreDims& d, const CatalogueLayout& p,
                 const float* buffer, const std::vector<uint8_t>& mask, float* out) {
  const int64_t N = d.items, M = d.users * d.items, C = d.width, E = d.experts, T = d.tasks;
  const int64_t expert_columns = E * d.first;
  const size_t L = p.experts.size();  // deeper layers
  const int64_t H = L == 0 ? d.first : p.experts.back().n;  // mixture width
  const int64_t H_pad = L == 0 ? d.first : p.experts.back().n_pad;
  const int64_t G_last = p.towers.hidden.empty() ? H : p.towers.hidden.back().n;
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
  const int64_t hidden_pad = widest_padded(p.experts, L == 0 ? 0 : L - 1);  // all deeper layers but the last
  const int64_t tower_pad = widest_padded(p.towers.hidden, p.towers.hidden.size());

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
        expert_layers(nb, p.experts, E, buffer, first.data(), C, d.first, hidden, expert_out.data(), expert_ld, H_pad);
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
            float* g = gate.data() + r * E;
            std::copy_n(first.data() + r * C + expert_columns + t * E, E, g);
            masked_softmax(g, allowed, E);
            mix_experts(mix.data() + r * H_pad, g, allowed, experts + r * expert_ld, E, expert_stride, H);
          }
          in = mix.data();
          in_ld = H_pad;
        }
        tower_scores(nb, p.towers, t, G_last, d.sigmoid[t], buffer, in, in_ld, tower, out + r0 * T + t, T);
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
  const std::vector<uint8_t> mask = gate_mask_bytes(gate_mask);
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
