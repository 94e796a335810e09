// expert_gate_mixture, CPU: what follows the one GEMM of the MMoE / PLE training path (experts'
// single layers and every gate's logits over the same input, `experts_and_gates`), forward and
// backward in one pass per row each:
//   z [B, E*H + G*E]: expert e's pre-activations in columns e*H .. e*H+H-1, gate g's logits in
//                     columns E*H + g*E .. E*H + g*E + E-1 (a -inf logit: expert not allowed);
//                     plus the GEMM's bias [E*H + G*E] when given (added while each row is read, so
//                     the GEMM is x W^T without addmm's broadcast copy of the bias into its output)
//   hidden[b, e, :]  = relu_dropout(z[b, :E*H], p, seed) viewed [E, H]  (relu_dropout's index, so
//                      bit-for-bit the relu_dropout op on that column slice)
//   weights[b, g, :] = softmax(z[b, E*H + g*E : E*H + (g+1)*E])
//   mixed[b, g, :]   = sum_e weights[b, g, e] * hidden[b, e, :]
// The backward writes d z [B, E*H + G*E] directly: no split/cat of the two parts, no separate
// relu_dropout and gated_mixture passes over [B, E, H] (together ~4 ms per 2048-row step at one
// thread, the cat alone ~1.5 ms), and with a bias also the bias gradient (the column sums of d z):
// one partial sum per fixed block of kRowGrain rows, the blocks added in order, so the result does
// not depend on the thread count. Sums accumulate in the dtype's accumulation type.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/lane_dot.h"
#include "relu_dropout/relu_dropout.h"

// no-trapping-math for the whole file: the backward's select on hidden > 0 (random signs) and
// relu_dropout_row must be if-converted, not branches (see relu_dropout.h).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

namespace mtkernels {
namespace {

constexpr int64_t kRowGrain = 64;

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be a float32 or float64 tensor, got ", t.scalar_type());
}

// H from z's width: z must be [B, E*H + G*E] with H >= 1.
int64_t hidden_width(const at::Tensor& z, int64_t num_experts, int64_t num_gates) {
  check_dim(z, 2, "z");
  check_float(z, "z");
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(num_gates >= 1, "num_gates must be >= 1, got ", num_gates);
  const int64_t rest = z.size(1) - num_gates * num_experts;
  TORCH_CHECK_VALUE(rest >= num_experts && rest % num_experts == 0, "z must be [B, E*H + G*E] with E = ",
                    num_experts, ", G = ", num_gates, " and H >= 1, got ", z.sizes());
  return rest / num_experts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_gate_mixture_cpu(const at::Tensor& z_in,
                                                                       const std::optional<at::Tensor>& bias_in,
                                                                       int64_t num_experts, int64_t num_gates, double p,
                                                                       int64_t seed) {
  const int64_t H = hidden_width(z_in, num_experts, num_gates);
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  const at::Tensor z = z_in.stride(1) == 1 ? z_in : z_in.contiguous();
  const int64_t B = z.size(0), E = num_experts, G = num_gates, EH = E * H;
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  at::Tensor bias;
  if (has_bias) {
    check_dim(*bias_in, 1, "bias");
    TORCH_CHECK_VALUE(bias_in->size(0) == z.size(1), "bias must be [E*H + G*E] = [", z.size(1), "] (z's width), got ",
                      bias_in->sizes());
    TORCH_CHECK_TYPE(bias_in->scalar_type() == z.scalar_type(), "bias must be ", z.scalar_type(), " like z, got ",
                     bias_in->scalar_type());
    bias = bias_in->contiguous();
  }
  at::Tensor mixed = at::empty({B, G, H}, z.options());
  at::Tensor hidden = at::empty({B, E, H}, z.options());
  at::Tensor weights = at::empty({B, G, E}, z.options());
  if (B == 0) return {mixed, hidden, weights};
  const uint32_t threshold = dropout_threshold(p);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t seed_lo = static_cast<uint32_t>(useed), seed_hi = static_cast<uint32_t>(useed >> 32);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "expert_gate_mixture", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t scale = static_cast<scalar_t>(dropout_scale(threshold));
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* mx = mixed.mutable_data_ptr<scalar_t>();
    scalar_t* hd = hidden.mutable_data_ptr<scalar_t>();
    scalar_t* wt = weights.mutable_data_ptr<scalar_t>();
    const scalar_t* bs = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    const int64_t zs0 = z.stride(0), width = z.size(1);
    at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(H), exps(E);
      std::vector<scalar_t> biased(bs ? width : 0);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* zr = zp + b * zs0;
        if (bs) {  // this row of z + bias, in L1 for the passes below
          for (int64_t c = 0; c < width; ++c) biased[c] = zr[c] + bs[c];
          zr = biased.data();
        }
        scalar_t* h = hd + b * EH;
        relu_dropout_row(zr, h, EH, static_cast<uint64_t>(b) * static_cast<uint64_t>(EH), threshold, seed_lo, seed_hi,
                         scale);
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* l = zr + EH + g * E;
          scalar_t* w = wt + (b * G + g) * E;
          acc_t top = -std::numeric_limits<acc_t>::infinity();
          for (int64_t e = 0; e < E; ++e) top = std::max(top, static_cast<acc_t>(l[e]));
          acc_t total = 0;
          for (int64_t e = 0; e < E; ++e) {  // each exp once: the libm calls are most of the forward's time
            exps[e] = std::exp(static_cast<acc_t>(l[e]) - top);
            total += exps[e];
          }
          std::fill(row.begin(), row.end(), acc_t(0));
          for (int64_t e = 0; e < E; ++e) {
            const acc_t we = exps[e] / total;
            w[e] = static_cast<scalar_t>(we);
            if (we == acc_t(0)) continue;
            const scalar_t* he = h + e * H;
            for (int64_t j = 0; j < H; ++j) row[j] += we * static_cast<acc_t>(he[j]);
          }
          scalar_t* m = mx + (b * G + g) * H;
          for (int64_t j = 0; j < H; ++j) m[j] = static_cast<scalar_t>(row[j]);
        }
      }
    });
  });
  return {mixed, hidden, weights};
}

std::tuple<at::Tensor, at::Tensor> expert_gate_mixture_backward_cpu(
    const at::Tensor& grad_mixed_in, const std::optional<at::Tensor>& grad_hidden_in,
    const std::optional<at::Tensor>& grad_weights_in, const at::Tensor& hidden_in, const at::Tensor& weights_in, double p,
    bool bias_grad) {
  check_dim(hidden_in, 3, "hidden");
  check_dim(weights_in, 3, "weights");
  check_dim(grad_mixed_in, 3, "grad_mixed");
  check_float(hidden_in, "hidden");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  const int64_t B = hidden_in.size(0), E = hidden_in.size(1), H = hidden_in.size(2), G = weights_in.size(1);
  TORCH_CHECK_VALUE(weights_in.size(0) == B && weights_in.size(2) == E, "weights must be [B, G, E] with B = ", B,
                    " and E = ", E, " (from hidden [B, E, H]), got ", weights_in.sizes());
  TORCH_CHECK_VALUE(grad_mixed_in.size(0) == B && grad_mixed_in.size(1) == G && grad_mixed_in.size(2) == H,
                    "grad_mixed must be [B, G, H] = [", B, ", ", G, ", ", H, "], got ", grad_mixed_in.sizes());
  const auto dtype = hidden_in.scalar_type();
  TORCH_CHECK_TYPE(weights_in.scalar_type() == dtype && grad_mixed_in.scalar_type() == dtype,
                   "grad_mixed, hidden and weights must have one dtype, got ", grad_mixed_in.scalar_type(), ", ", dtype,
                   " and ", weights_in.scalar_type());
  const bool has_grad_hidden = grad_hidden_in.has_value() && grad_hidden_in->defined();
  const bool has_grad_weights = grad_weights_in.has_value() && grad_weights_in->defined();
  at::Tensor grad_hidden, grad_weights;
  if (has_grad_hidden) {
    TORCH_CHECK_VALUE(grad_hidden_in->sizes() == hidden_in.sizes(), "grad_hidden must be [B, E, H] = ", hidden_in.sizes(),
                      ", got ", grad_hidden_in->sizes());
    TORCH_CHECK_TYPE(grad_hidden_in->scalar_type() == dtype, "grad_hidden must be ", dtype, ", got ",
                     grad_hidden_in->scalar_type());
    grad_hidden = grad_hidden_in->contiguous();
  }
  if (has_grad_weights) {
    TORCH_CHECK_VALUE(grad_weights_in->sizes() == weights_in.sizes(), "grad_weights must be [B, G, E] = ",
                      weights_in.sizes(), ", got ", grad_weights_in->sizes());
    TORCH_CHECK_TYPE(grad_weights_in->scalar_type() == dtype, "grad_weights must be ", dtype, ", got ",
                     grad_weights_in->scalar_type());
    grad_weights = grad_weights_in->contiguous();
  }
  // grad_mixed is read in place when each [H] row is contiguous (the towers hand it over as the
  // transpose of a [G, B, H] gradient: no copy), else copied
  const at::Tensor grad_mixed = grad_mixed_in.stride(2) == 1 ? grad_mixed_in : grad_mixed_in.contiguous();
  const at::Tensor hidden = hidden_in.contiguous(),
                   weights = weights_in.contiguous();
  const int64_t EH = E * H, width = EH + G * E;
  at::Tensor grad_z = at::empty({B, width}, hidden.options());
  at::Tensor grad_bias = at::empty({bias_grad ? width : 0}, hidden.options());
  if (B == 0) {
    grad_bias.zero_();
    return {grad_z, grad_bias};
  }
  const uint32_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES(dtype, "expert_gate_mixture_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t scale = static_cast<scalar_t>(dropout_scale(threshold));
    const scalar_t* gm = grad_mixed.const_data_ptr<scalar_t>();
    const int64_t gm_b = grad_mixed.stride(0), gm_g = grad_mixed.stride(1);
    const scalar_t* gh = has_grad_hidden ? grad_hidden.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gw = has_grad_weights ? grad_weights.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* hd = hidden.const_data_ptr<scalar_t>();
    const scalar_t* wt = weights.const_data_ptr<scalar_t>();
    scalar_t* gz = grad_z.mutable_data_ptr<scalar_t>();
    // bias gradient: one partial column sum per block of kRowGrain rows (fixed blocks, whatever the
    // threads), added in block order below
    const int64_t num_blocks = (B + kRowGrain - 1) / kRowGrain;
    std::vector<acc_t> partial(bias_grad ? num_blocks * width : 0, acc_t(0));
    at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<acc_t> dw(E), acc(H);
      std::vector<scalar_t> grad_h(H);
      for (int64_t b = block_begin * kRowGrain; b < std::min(B, block_end * kRowGrain); ++b) {
        const scalar_t* h = hd + b * EH;
        scalar_t* out = gz + b * width;
        // gate logits: d weights[g, e] = <grad_mixed[g], hidden[e]> (+ grad_weights), then the softmax backward
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* grad = gm + b * gm_b + g * gm_g;
          const scalar_t* w = wt + (b * G + g) * E;
          acc_t weighted = 0;
          for (int64_t e = 0; e < E; ++e) {
            acc_t d = lane_dot<scalar_t, acc_t>(grad, h + e * H, H);
            if (gw) d += static_cast<acc_t>(gw[(b * G + g) * E + e]);
            dw[e] = d;
            weighted += static_cast<acc_t>(w[e]) * d;
          }
          for (int64_t e = 0; e < E; ++e)
            out[EH + g * E + e] = static_cast<scalar_t>(static_cast<acc_t>(w[e]) * (dw[e] - weighted));
        }
        // expert pre-activations: d hidden[e] = sum_g weights[g, e] grad_mixed[g] (+ grad_hidden), then
        // relu_dropout's backward (scale where hidden > 0, else 0)
        for (int64_t e = 0; e < E; ++e) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t g = 0; g < G; ++g) {
            const acc_t we = static_cast<acc_t>(wt[(b * G + g) * E + e]);
            if (we == acc_t(0)) continue;
            const scalar_t* grad = gm + b * gm_b + g * gm_g;
            for (int64_t j = 0; j < H; ++j) acc[j] += we * static_cast<acc_t>(grad[j]);
          }
          const scalar_t* he = h + e * H;
          scalar_t* o = out + e * H;
          if (gh) {
            const scalar_t* ghe = gh + b * EH + e * H;
            for (int64_t j = 0; j < H; ++j) grad_h[j] = static_cast<scalar_t>(acc[j]) + ghe[j];
          } else {
            for (int64_t j = 0; j < H; ++j) grad_h[j] = static_cast<scalar_t>(acc[j]);
          }
          for (int64_t j = 0; j < H; ++j) {
            const scalar_t v = grad_h[j] * scale;
            o[j] = he[j] > scalar_t(0) ? v : scalar_t(0);
          }
        }
        if (bias_grad) {
          acc_t* sum = partial.data() + (b / kRowGrain) * width;
          for (int64_t c = 0; c < width; ++c) sum[c] += static_cast<acc_t>(out[c]);
        }
      }
    });
    if (bias_grad) {
      scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < width; ++c) {
        acc_t total = 0;
        for (int64_t k = 0; k < num_blocks; ++k) total += partial[k * width + c];
        gb[c] = static_cast<scalar_t>(total);
      }
    }
  });
  return {grad_z, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("expert_gate_mixture", &expert_gate_mixture_cpu);
  m.impl("expert_gate_mixture_backward", &expert_gate_mixture_backward_cpu);
}

}  // namespace mtkernels

#pragma GCC pop_options
