// MoE router in one call: gate logits, softmax, top-k, optional renormalisation, and the per-expert pair
// counts the engine records (its expert-load traces), for tokens x [T, H] and a gate weight [E, H].
//
// Torch oracle: SparseMoE.route + torch.bincount (meshserve/models/layers/moe.py). The torch route is six
// small ops per layer (linear, softmax, topk, sum, div, bincount), each a dispatch and for bfloat16 an
// [T, 8] GEMM through a slow generic path; here one pass per token does all of it.
// Numerics follow the oracle: logits accumulate in float32 and are rounded to the model dtype (F.linear's
// output), softmax runs in float32 (exp(l - max) times 1 / sum), and top-k picks with the same comparator
// and std:: algorithm as ATen's CPU topk (TopKImpl.h), so ties between equal probabilities resolve as
// torch resolves them. Only float32 summation order (the dot products, the softmax sum) and exp's last
// bit differ.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

#include "bf16_bits.h"

namespace meshserve {
namespace {

template <typename T>
inline float value(T v) {
  if constexpr (std::is_same_v<T, float>) return v; else return bits_to_float(v);
}

// Rounds a float32 logit to the model dtype, as F.linear's output in that dtype.
template <typename T>
inline float in_model_dtype(float v) {
  if constexpr (std::is_same_v<T, float>) return v; else return bits_to_float(float_to_bits(v));
}

constexpr int64_t kExpertGroup = 8;  // experts whose dot products share one pass over a token's row

// logits[j] = float32 dot products of row with the gate rows e0 + j, j < n <= kExpertGroup.
template <typename T>
void dot_group(const T* row, const T* w, int64_t hidden, int64_t n, float* logits) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  auto load = [](const T* p, __mmask16 mask) {  // 16 values (masked lanes 0) as float32
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_maskz_loadu_ps(mask, p);
    } else {
      const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
  };
  __m512 acc[kExpertGroup];
  for (int64_t j = 0; j < kExpertGroup; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < hidden; h += 16) {
    const __mmask16 mask = hidden - h >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (hidden - h)) - 1);
    const __m512 xv = load(row + h, mask);
    for (int64_t j = 0; j < kExpertGroup; ++j)
      if (j < n) acc[j] = _mm512_fmadd_ps(xv, load(w + j * hidden + h, mask), acc[j]);
  }
  for (int64_t j = 0; j < n; ++j) logits[j] = _mm512_reduce_add_ps(acc[j]);
#else
  for (int64_t j = 0; j < n; ++j) {
    float sum = 0.f;
    for (int64_t h = 0; h < hidden; ++h) sum += value(row[h]) * value(w[j * hidden + h]);
    logits[j] = sum;
  }
#endif
}

// Top-k of probs (E values) into (prob, expert) pairs, ATen's CPU topk (largest, sorted) step for step.
inline void topk(const float* probs, int64_t experts, int64_t k, std::vector<std::pair<float, int64_t>>& queue) {
  for (int64_t e = 0; e < experts; ++e) queue[e] = {probs[e], e};
  auto larger = [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) {
    return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
  };
  if (k * 64 <= experts) {
    std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), larger);
  } else {
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), larger);
    std::sort(queue.begin(), queue.begin() + k - 1, larger);
  }
}

// T: float or uint16_t (bfloat16 bits).
template <typename T>
void route_impl(const T* x, const T* w, int64_t tokens, int64_t hidden, int64_t experts, int64_t k,
                bool renormalize, float* weights, int64_t* ids) {
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(experts);
    std::vector<std::pair<float, int64_t>> queue(experts);
    for (int64_t t = begin; t < end; ++t) {
      const T* row = x + t * hidden;
      for (int64_t e0 = 0; e0 < experts; e0 += kExpertGroup)
        dot_group(row, w + e0 * hidden, hidden, std::min(kExpertGroup, experts - e0), probs.data() + e0);
      float top = -INFINITY;
      for (int64_t e = 0; e < experts; ++e) {
        probs[e] = in_model_dtype<T>(probs[e]);
        top = std::max(top, probs[e]);
      }
      float total = 0.f;
      for (int64_t e = 0; e < experts; ++e) {
        probs[e] = std::exp(probs[e] - top);
        total += probs[e];
      }
      const float inv = 1.f / total;
      for (int64_t e = 0; e < experts; ++e) probs[e] *= inv;
      topk(probs.data(), experts, k, queue);
      float kept = 0.f;
      for (int64_t j = 0; j < k; ++j) kept += queue[j].first;
      for (int64_t j = 0; j < k; ++j) {
        weights[t * k + j] = renormalize ? queue[j].first / kept : queue[j].first;
        ids[t * k + j] = queue[j].second;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route(const at::Tensor& x, const at::Tensor& gate_w,
                                                          int64_t top_k, bool renormalize) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "moe_route: x must be a contiguous [tokens, hidden] tensor");
  TORCH_CHECK(gate_w.dim() == 2 && gate_w.is_contiguous() && gate_w.size(1) == x.size(1) &&
                  gate_w.scalar_type() == x.scalar_type(),
              "moe_route: gate weight must be a contiguous [experts, hidden] tensor of x's dtype");
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = gate_w.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= experts, "moe_route: top_k ", top_k, " outside [1, ", experts, "]");
  at::Tensor weights = at::empty({tokens, top_k}, x.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  float* ws = weights.data_ptr<float>();
  int64_t* is = ids.data_ptr<int64_t>();
  if (x.scalar_type() == at::kFloat) {
    route_impl(x.data_ptr<float>(), gate_w.data_ptr<float>(), tokens, hidden, experts, top_k, renormalize, ws, is);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "moe_route: float32 or bfloat16 only");
    route_impl(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
               reinterpret_cast<const uint16_t*>(gate_w.data_ptr<at::BFloat16>()), tokens, hidden, experts,
               top_k, renormalize, ws, is);
  }
  at::Tensor counts = at::zeros({experts}, x.options().dtype(at::kLong));
  int64_t* cs = counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < tokens * top_k; ++p) ++cs[is[p]];
  return {weights, ids, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("moe_route(Tensor x, Tensor gate_w, int top_k, bool renormalize) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("moe_route", &moe_route); }

}  // namespace meshserve
