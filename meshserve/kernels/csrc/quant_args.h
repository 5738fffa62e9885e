// quant_args.h: what quant_linear.cpp and quant_moe.cpp share around the tiles of quant_tile.h: checking a
// packed weight's tensors (one matrix [n, K] or a stack of experts [E, n, K]) and turning activation rows
// into the kernels' rows (float32, act-order perm applied, each group zero-padded to whole units) with
// their group sums (for the zero terms).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "bf16_bits.h"
#include "quant_tile.h"

namespace meshserve {
namespace quant_args {

// Checks a packed weight (kernels/quant_gemm.py pack_quant) for in_features k and returns expert e's matrix
// (e = 0 for an unstacked weight). stacked: the tensors carry a leading expert dim.
inline quant_tile::Matrix matrix(const char* op, const at::Tensor& q, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                                 int64_t bits, int64_t group_size, int64_t n, int64_t k, int64_t e,
                                 bool stacked = false) {
  const int64_t lead = stacked ? 1 : 0;
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(group_size >= 1 && k % group_size == 0, op, ": group_size (", group_size,
              ") must divide in_features (", k, ")");
  const int64_t unit_k = bits == 8 ? 4 : 8, groups = k / group_size;
  const int64_t group_units = (group_size + unit_k - 1) / unit_k, blocks = (n + 15) / 16;
  TORCH_CHECK(n > 0, op, ": n must be positive, got ", n);
  TORCH_CHECK(q.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && q.is_contiguous() &&
                  q.dim() == 3 + lead && q.size(lead) == blocks && q.size(lead + 1) == groups * group_units &&
                  q.size(lead + 2) == 64,
              op, ": qweight does not match n = ", n, ", in_features = ", k, ", group_size = ", group_size,
              ", bits = ", bits, " (pack it with quant_gemm.pack_quant)");
  const int64_t experts = stacked ? q.size(0) : 1;
  TORCH_CHECK(e >= 0 && e < experts, op, ": expert ", e, " outside [0, ", experts, ")");
  auto same_lead = [&](const at::Tensor& t) { return !stacked || t.size(0) == experts; };
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 3 + lead &&
                  same_lead(scales) && scales.size(lead) == blocks && scales.size(lead + 1) == groups &&
                  scales.size(lead + 2) == 16,
              op, ": scales must be float32 [", stacked ? "E, " : "", blocks, ", ", groups, ", 16]");
  const uint8_t* zs = nullptr;
  if (zeros.has_value() && zeros->defined()) {
    TORCH_CHECK(zeros->scalar_type() == q.scalar_type() && zeros->is_contiguous() &&
                    zeros->sizes() == scales.sizes(),
                op, ": zeros must be shaped like scales, in qweight's dtype");
    zs = reinterpret_cast<const uint8_t*>(zeros->data_ptr()) + e * blocks * groups * 16;
  }
  if (perm.has_value() && perm->defined()) {
    TORCH_CHECK(perm->scalar_type() == at::kLong && perm->is_contiguous() && perm->dim() == 1 + lead &&
                    same_lead(*perm) && perm->size(lead) == k,
                op, ": perm must be int64 [", stacked ? "E, " : "", k, "]");
    const int64_t* p = perm->data_ptr<int64_t>();
    const bool in_range = std::all_of(p, p + perm->numel(), [k](int64_t v) { return v >= 0 && v < k; });
    TORCH_CHECK(in_range, op, ": perm entries must lie in [0, ", k, ")");
  }
  const auto* qs = reinterpret_cast<const uint8_t*>(q.data_ptr()) + e * blocks * groups * group_units * 64;
  return {static_cast<int>(bits), n, blocks, groups, group_units, qs,
          scales.data_ptr<float>() + e * blocks * groups * 16, zs};
}

template <typename T>
inline float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v; else return bits_to_float(v);
}

// One activation row (k values of T: float, or bfloat16 bits) into the kernel's row dst [w.padded_k()]:
// dst[g * gp + i] = src[perm[g * gs + i]] (perm null: identity), zeros in each group's padding; sx[g] =
// the group's sum when sx is not null.
template <typename T>
inline void kernel_row(const T* src, const int64_t* perm, const quant_tile::Matrix& w, int64_t group_size,
                       float* dst, float* sx) {
  const int64_t gp = w.group_units * w.unit_k();
  for (int64_t g = 0; g < w.groups; ++g) {
    float* d = dst + g * gp;
    const int64_t k0 = g * group_size;
    if (perm) {
      for (int64_t i = 0; i < group_size; ++i) d[i] = to_float(src[perm[k0 + i]]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < group_size; ++i) d[i] = to_float(src[k0 + i]);
    }
    std::fill(d + group_size, d + gp, 0.f);
    if (sx) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < group_size; ++i) sum += d[i];
      sx[g] = sum;
    }
  }
}

// All rows of x [M, K] (float32 or bfloat16, any row stride) as kernel rows: (a [M, padded K], sx [M,
// groups]).
inline std::tuple<at::Tensor, at::Tensor> kernel_rows(const at::Tensor& x, const at::Tensor& perm,
                                                      const quant_tile::Matrix& w, int64_t group_size) {
  const int64_t m = x.size(0);
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor a = at::empty({m, w.padded_k()}, x.options().dtype(at::kFloat));
  at::Tensor sx = at::empty({m, w.groups}, a.options());
  const int64_t* p = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
  float* as = a.data_ptr<float>();
  float* sxs = sx.data_ptr<float>();
  const int64_t ld = xc.stride(0), grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, x.size(1)));
  auto run = [&](const auto* xs) {
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        kernel_row(xs + r * ld, p, w, group_size, as + r * w.padded_k(), sxs + r * w.groups);
    });
  };
  if (x.scalar_type() == at::kFloat) run(xc.data_ptr<float>());
  else run(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()));
  return {a, sx};
}

}  // namespace quant_args
}  // namespace meshserve
