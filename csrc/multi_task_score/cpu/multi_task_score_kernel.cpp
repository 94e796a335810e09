// multi_task_score, CPU: experts, per-task softmax gates, task towers and output transforms
// (ARCHITECTURE §3.2), float32 arithmetic throughout (bfloat16/float16 inputs are widened once).
//
// Every weight matrix is packed into 16-column panels (the BLIS / GotoBLAS layout: Goto & van de
// Geijn, "Anatomy of High-Performance Matrix Multiplication", TOMS 2008) in one float32 buffer,
// either once by `multi_task_score_pack` (the Python wrapper caches it per params object and
// repacks when a weight's version counter moves) or per call by `multi_task_score`. One
// at::parallel_for over blocks of rows then runs the whole network on a block while its
// activations sit in L2: each expert's layers (bias + ReLU fused into the store), the gate
// logits and their masked softmax, the per-task mixtures, the towers and the transforms. The
// [M, E*H_1] first-layer activations, the [M, T, H] mixtures and later layers exist only per
// block; every product runs on one register-tiled micro-kernel (6 rows x 16 columns, 12 AVX2
// accumulators), which on the 2-core EPYC this was tuned on matches MKL's sgemm rate on these
// shapes without its per-call packing.

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

#include "common/packed_gemm.h"
#include "multi_task_score/multi_task_score.h"

namespace mtkernels {
namespace {

// Rows per block: the block's input rows, one expert's hidden layer and all experts' last layer
// (72 x (256 + 128 + 8*64) floats for the MMoE, about 260 KB) stay in a 512 KB L2.
constexpr int64_t kBlockRows = 72;
constexpr int64_t kOneBlockRows = 64;

// Where each layer lives in the packed buffer, derived from the network's dimensions alone, so
// a buffer packed earlier is checked against the params it is used with by its size.
struct PackedLayout {
  std::vector<PackedLayer> experts;  // L layers, E groups; layer 0 reads x (k = D)
  PackedLayer gates;                 // one group: the [T*E, D] gate logits
  PackedTowers towers;               // T groups
  int64_t size = 0;
};

PackedLayout packed_layout(const MultiTaskScoreDims& d) {
  PackedLayout p;
  LayoutBuilder b;
  int64_t fan_in = d.width;
  p.experts = b.add_stack(d.experts, d.expert_sizes, fan_in);
  p.gates = b.add(1, d.tasks * d.experts, d.width);
  p.towers = add_towers(b, d.tasks, d.tower_sizes, fan_in);
  p.size = b.offset;
  return p;
}

void pack_into(const PackedLayout& p, at::TensorList expert_weights, at::TensorList expert_biases,
               const at::Tensor& gate_weight, const at::Tensor& gate_bias, at::TensorList tower_weights,
               at::TensorList tower_biases, float* buffer) {
  pack_stack(p.experts, expert_weights, expert_biases, buffer);
  pack_layer(p.gates, as_float(gate_weight).const_data_ptr<float>(), as_float(gate_bias).const_data_ptr<float>(),
             buffer);
  pack_towers(p.towers, tower_weights, tower_biases, buffer);
}

// The scoring pass: x [M, D] float32 contiguous, the packed buffer, out [M, T] float32.
void score_packed(const float* x, const MultiTaskScoreDims& d, const PackedLayout& p, const float* buffer,
                  const std::vector<uint8_t>& mask, float* out) {
  const int64_t M = d.rows, E = d.experts, T = d.tasks, D = d.width;
  const size_t L = p.experts.size();
  const int64_t H = d.expert_sizes.back();  // mixture width
  const int64_t H_pad = p.experts.back().n_pad;
  const int64_t expert_out_ld = E * H_pad;
  const int64_t G_last = p.towers.hidden.empty() ? H : p.towers.hidden.back().n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // A small call (up to kOneBlockRows rows per thread) is one block per thread. Larger calls: a
  // multiple of `threads` blocks of about kBlockRows rows, at least two per thread, so that on a
  // shared machine a descheduled thread's second block is taken by the others. (One block per
  // thread would stream the weights once per thread instead of twice, but leaves nothing to
  // take over: the thread that finished waits at the join for the descheduled one.)
  int64_t num_blocks = threads;
  if (M > threads * kOneBlockRows)
    num_blocks = round_up(std::max<int64_t>(2 * threads, (M + kBlockRows - 1) / kBlockRows), threads);
  // Whole 6-row tiles where the rows allow: the last tile of a block is computed in full over
  // rows already done (see small_gemm), so an uneven block wastes up to 5 rows per panel.
  const int64_t even = (M + num_blocks - 1) / num_blocks;
  const int64_t block = even >= kTileRows ? round_up(even, kTileRows) : std::max<int64_t>(1, even);
  num_blocks = (M + block - 1) / block;
  const int64_t hidden_pad = widest_padded(p.experts, L - 1);  // the expert hidden layers (all but the last)
  const int64_t tower_pad = widest_padded(p.towers.hidden, p.towers.hidden.size());

  // Blocks are claimed dynamically: on a shared machine a thread that was descheduled finds the
  // work already taken by the others instead of making them wait at the join.
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min(threads, num_blocks), 1, [&](int64_t, int64_t) {
    // Per-thread scratch, reused by every block of this thread; widths padded to 16 columns.
    std::vector<float> hidden[2];
    for (auto& h : hidden) h.resize(static_cast<size_t>(block * hidden_pad));
    std::vector<float> expert_out(static_cast<size_t>(block * expert_out_ld));
    std::vector<float> gate(static_cast<size_t>(block * p.gates.n_pad));
    const int64_t mix_ld = H_pad;
    std::vector<float> mix(static_cast<size_t>(block * mix_ld));
    std::vector<float> tower[2];
    for (auto& h : tower) h.resize(static_cast<size_t>(block * tower_pad));

    for (int64_t blk = next_block.fetch_add(1); blk < num_blocks; blk = next_block.fetch_add(1)) {
      const int64_t r0 = blk * block;
      const int64_t nb = std::min(block, M - r0);
      const float* xb = x + r0 * D;

      // Each expert's layers, the last one into its columns of expert_out.
      expert_layers(nb, p.experts, E, buffer, xb, D, 0, hidden, expert_out.data(), expert_out_ld, H_pad);
      // Gate logits and the masked softmax over each task's allowed experts, in place.
      const int64_t gate_ld = p.gates.n_pad;
      small_gemm(nb, p.gates, 0, buffer, xb, D, /*relu=*/false, gate.data(), gate_ld);
      for (int64_t r = 0; r < nb; ++r)
        for (int64_t t = 0; t < T; ++t) masked_softmax(gate.data() + r * gate_ld + t * E, mask.data() + t * E, E);

      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* allowed = mask.data() + t * E;
        // mixture_t = sum over allowed experts of gate weight x expert output, per row.
        for (int64_t r = 0; r < nb; ++r) {
          mix_experts(mix.data() + r * mix_ld, gate.data() + r * gate_ld + t * E, allowed,
                      expert_out.data() + r * expert_out_ld, E, H_pad, H);
        }
        // tower: hidden layers on the micro-kernel, the 1-wide last layer as a dot product.
        tower_scores(nb, p.towers, t, G_last, d.sigmoid[t], buffer, mix.data(), mix_ld, tower, out + r0 * T + t, T);
      }
    }
  });
}

void check_native_dtype(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble,
                   "x: the native multi_task_score computes in float32; float64 input runs on "
                   "mtkernels.reference.multi_task_score (mtkernels.ops.multi_task_score routes it there)");
}

at::Tensor score(const at::Tensor& x_in, const MultiTaskScoreDims& d, const PackedLayout& p, const float* buffer,
                 const std::vector<uint8_t>& mask) {
  at::Tensor out = at::empty({d.rows, d.tasks}, x_in.options());
  if (d.rows == 0) return out;
  const at::Tensor x = as_float(x_in);
  at::Tensor out_f = x_in.scalar_type() == at::kFloat ? out : at::empty({d.rows, d.tasks}, x.options());
  score_packed(x.const_data_ptr<float>(), d, p, buffer, mask, out_f.data_ptr<float>());
  if (!out_f.is_same(out)) out.copy_(out_f);
  return out;
}

at::Tensor multi_task_score_cpu(const at::Tensor& x, at::TensorList expert_weights, at::TensorList expert_biases,
                                const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                                const at::Tensor& gate_mask, at::TensorList tower_weights,
                                at::TensorList tower_biases, std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only: no autograd inside
  const MultiTaskScoreDims d = check_multi_task_score_inputs(x, expert_weights, expert_biases, gate_weight,
                                                             gate_bias, gate_mask, tower_weights, tower_biases,
                                                             transforms);
  check_native_dtype(x);
  const std::vector<uint8_t> mask = gate_mask_bytes(gate_mask);
  if (d.rows == 0) return at::empty({0, d.tasks}, x.options());
  const PackedLayout p = packed_layout(d);
  at::Tensor buffer = at::empty({p.size}, x.options().dtype(at::kFloat));
  pack_into(p, expert_weights, expert_biases, gate_weight, gate_bias, tower_weights, tower_biases,
            buffer.data_ptr<float>());
  return score(x, d, p, buffer.const_data_ptr<float>(), mask);
}

at::Tensor multi_task_score_pack_cpu(at::TensorList expert_weights, at::TensorList expert_biases,
                                     const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                                     const at::Tensor& gate_mask, at::TensorList tower_weights,
                                     at::TensorList tower_biases, std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK_VALUE(gate_weight.dim() == 3, "params.gate_weight must have shape [T, E, D], got ",
                    gate_weight.sizes());
  // The checks take their D and dtype from x: an empty x of the gates' width and dtype.
  const at::Tensor x = at::empty({0, gate_weight.size(2)}, gate_weight.options());
  const MultiTaskScoreDims d = check_multi_task_score_inputs(x, expert_weights, expert_biases, gate_weight,
                                                             gate_bias, gate_mask, tower_weights, tower_biases,
                                                             transforms);
  check_native_dtype(x);
  const PackedLayout p = packed_layout(d);
  at::Tensor buffer = at::empty({p.size}, x.options().dtype(at::kFloat));
  pack_into(p, expert_weights, expert_biases, gate_weight, gate_bias, tower_weights, tower_biases,
            buffer.data_ptr<float>());
  return buffer;
}

at::Tensor multi_task_score_packed_cpu(const at::Tensor& x, at::TensorList expert_weights,
                                       at::TensorList expert_biases, const at::Tensor& gate_weight,
                                       const at::Tensor& gate_bias, const at::Tensor& gate_mask,
                                       at::TensorList tower_weights, at::TensorList tower_biases,
                                       std::vector<std::string> transforms, const at::Tensor& packed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MultiTaskScoreDims d = check_multi_task_score_inputs(x, expert_weights, expert_biases, gate_weight,
                                                             gate_bias, gate_mask, tower_weights, tower_biases,
                                                             transforms);
  check_native_dtype(x);
  const std::vector<uint8_t> mask = gate_mask_bytes(gate_mask);
  const PackedLayout p = packed_layout(d);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kFloat,
                   "packed must be the float32 tensor multi_task_score_pack returns, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.numel() == p.size && packed.is_contiguous() &&
                        packed.device() == x.device(),
                    "packed must be the contiguous 1-D tensor of ", p.size,
                    " floats that multi_task_score_pack returns for these params (on x's device), got shape ",
                    packed.sizes(), " on ", packed.device());
  return score(x, d, p, packed.const_data_ptr<float>(), mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("multi_task_score", &multi_task_score_cpu);
  m.impl("multi_task_score_pack", &multi_task_score_pack_cpu);
  m.impl("multi_task_score_packed", &multi_task_score_packed_cpu);
}

}  // namespace mtkernels
