// Fused elementwise ops of the dense forward: each reads and writes its rows once instead of once per
// torch op (RMSNorm alone is six ops and three float32 temporaries in torch).
//
// Torch oracle: meshserve/kernels/fused.py (*_reference). Maths follow it: float32 inside, and every
// value the reference rounds to the model dtype (bfloat16) is rounded here at the same point, so the
// results differ from the reference only by float32 summation order and the exp/rsqrt approximations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "bf16_bits.h"
#include "fast_exp.h"

#pragma GCC optimize("fp-contract=off")  // no fused multiply-add: round like the separate torch ops

namespace meshserve {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // rows per thread chunk cover at least this many values

// Kernels work on raw storage: float, or the 16 bits of a bfloat16 (bf16_bits.h), so their loops vectorise.
template <typename T> struct RawOf { using type = T; };
template <> struct RawOf<c10::BFloat16> { using type = uint16_t; };
template <typename T> using Raw = typename RawOf<T>::type;

template <typename T>
Raw<T>* raw(const at::Tensor& t) { return reinterpret_cast<Raw<T>*>(t.data_ptr<T>()); }

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bits_to_float(v); }
template <typename S> inline S from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline uint16_t from_float<uint16_t>(float v) { return float_to_bits(v); }
// Round to the storage type and back: a no-op for float, round-to-nearest-even for bfloat16.
template <typename S>
inline float rounded(float v) {
  return to_float(from_float<S>(v));
}

int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements)); }


// A float32 operand of a bfloat16 op is the unrounded output of a float32 GEMM (SmoothGEMM's packed_f32
// kernel): the reference rounds it to the model dtype T first, so it is rounded here on reading. A
// float32 result for such a GEMM holds T-rounded values, so the GEMM reads exactly what T would give.

// out = weight * T(x * rsqrt(mean(x^2) + eps)) for one row already in float32.
template <typename T, typename O>
inline void norm_row(const float* x, const Raw<T>* weight, Raw<O>* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = from_float<Raw<O>>(rounded<Raw<T>>(to_float(weight[i]) * rounded<Raw<T>>(x[i] * inv)));
  }
}

// x <- T(x + T(delta)) (when delta is given) and out = norm(x), row by row.
template <typename T, typename D, typename O>
void add_rms_norm_impl(at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps,
                       at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1);
  Raw<T>* xp = raw<T>(x);
  const Raw<D>* dp = delta ? raw<D>(*delta) : nullptr;
  const Raw<T>* wp = raw<T>(weight);
  Raw<O>* op = raw<O>(out);
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      Raw<T>* xr = xp + r * n;
      if (dp) {
        const Raw<D>* dr = dp + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const Raw<T> s = from_float<Raw<T>>(to_float(xr[i]) + rounded<Raw<T>>(to_float(dr[i])));
          xr[i] = s;
          row[i] = to_float(s);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) row[i] = to_float(xr[i]);
      }
      norm_row<T, O>(row.data(), wp, op + r * n, n, static_cast<float>(eps));
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, hidden] tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), "weight [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
}

bool is_float(const at::Tensor& t) { return t.scalar_type() == at::kFloat; }

template <typename T>
void dispatch_norm(at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps, at::Tensor& out) {
  const bool d32 = delta && is_float(*delta), o32 = is_float(out);
  if (d32 && o32) add_rms_norm_impl<T, float, float>(x, delta, weight, eps, out);
  else if (d32) add_rms_norm_impl<T, float, T>(x, delta, weight, eps, out);
  else if (o32) add_rms_norm_impl<T, T, float>(x, delta, weight, eps, out);
  else add_rms_norm_impl<T, T, T>(x, delta, weight, eps, out);
}

at::Tensor norm_entry(at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps, bool out_f32) {
  auto out = at::empty_like(x, out_f32 ? x.options().dtype(at::kFloat) : x.options());
  if (is_float(x)) {
    dispatch_norm<float>(x, delta, weight, eps, out);
  } else {
    dispatch_norm<c10::BFloat16>(x, delta, weight, eps, out);
  }
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool out_f32) {
  check_rows(x, weight);
  auto xm = x;  // read only: no delta means no write
  return norm_entry(xm, nullptr, weight, eps, out_f32);
}

at::Tensor add_rms_norm(at::Tensor x, const at::Tensor& delta, const at::Tensor& weight, double eps, bool out_f32) {
  check_rows(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous(), "delta must be contiguous and match x");
  TORCH_CHECK(delta.scalar_type() == x.scalar_type() || is_float(delta), "delta: x's dtype or float32");
  return norm_entry(x, &delta, weight, eps, out_f32);
}

// Rotate-half RoPE on the q and k heads of each row of the fused qkv GEMM output
// [T, (heads + 2 kv_heads) * D]: the first heads + kv_heads heads of a row; the v heads are copied
// (rounded) when the output is a new tensor, left alone when it is the input.
template <typename In, typename T>
void rotary_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t rotated_heads,
                 int64_t dim, at::Tensor& out) {
  const int64_t rows = qkv.size(0), stride = qkv.stride(0), width = out.size(1), half = dim / 2;
  const int64_t out_stride = out.stride(0);
  const Raw<In>* base = raw<In>(qkv);
  Raw<T>* obase = raw<T>(out);
  const bool copy_rest = static_cast<const void*>(base) != static_cast<const void*>(obase);
  const Raw<T>* cp = raw<T>(cos);
  const Raw<T>* sp = raw<T>(sin);
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Raw<T>* c = cp + r * dim;
      const Raw<T>* s = sp + r * dim;
      for (int64_t h = 0; h < rotated_heads; ++h) {
        const Raw<In>* x = base + r * stride + h * dim;
        Raw<T>* o = obase + r * out_stride + h * dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = rounded<Raw<T>>(to_float(x[i])), b = rounded<Raw<T>>(to_float(x[i + half]));
          // x * cos + rotate_half(x) * sin, each product rounded as the reference's separate ops are
          o[i] = from_float<Raw<T>>(rounded<Raw<T>>(a * to_float(c[i])) + rounded<Raw<T>>(-b * to_float(s[i])));
          o[i + half] = from_float<Raw<T>>(rounded<Raw<T>>(b * to_float(c[i + half])) + rounded<Raw<T>>(a * to_float(s[i + half])));
        }
      }
      if (copy_rest) {
        const Raw<In>* x = base + r * stride;
        Raw<T>* o = obase + r * out_stride;
#pragma omp simd
        for (int64_t i = rotated_heads * dim; i < width; ++i) o[i] = from_float<Raw<T>>(to_float(x[i]));
      }
    }
  });
}

void check_rotary(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                  int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, width] with contiguous rows");
  TORCH_CHECK(head_dim % 2 == 0 && qkv.size(1) >= (num_heads + num_kv_heads) * head_dim, "qkv too narrow");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == qkv.size(0) && cos.size(1) == head_dim && cos.is_contiguous(),
              "cos [T, head_dim]");
  TORCH_CHECK(sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == cos.scalar_type(),
              "sin [T, head_dim], cos's dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() || is_float(qkv), "qkv: cos's dtype or float32");
}

void rotary_qkv_(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                 int64_t num_kv_heads, int64_t head_dim) {
  check_rotary(qkv, cos, sin, num_heads, num_kv_heads, head_dim);
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type(), "in place: qkv must have cos's dtype");
  if (is_float(qkv)) {
    rotary_impl<float, float>(qkv, cos, sin, num_heads + num_kv_heads, head_dim, qkv);
  } else {
    rotary_impl<c10::BFloat16, c10::BFloat16>(qkv, cos, sin, num_heads + num_kv_heads, head_dim, qkv);
  }
}

// The same rotation from a float32 GEMM output into a new tensor of cos's dtype (q, k and v rounded).
at::Tensor rotary_qkv_cast(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_rotary(qkv, cos, sin, num_heads, num_kv_heads, head_dim);
  auto out = at::empty({qkv.size(0), qkv.size(1)}, cos.options());
  const int64_t heads = num_heads + num_kv_heads;
  if (is_float(cos)) {
    rotary_impl<float, float>(qkv, cos, sin, heads, head_dim, out);
  } else if (is_float(qkv)) {
    rotary_impl<float, c10::BFloat16>(qkv, cos, sin, heads, head_dim, out);
  } else {
    rotary_impl<c10::BFloat16, c10::BFloat16>(qkv, cos, sin, heads, head_dim, out);
  }
  return out;
}

// out = T(silu(T(gate))) * T(up) for gate_up [T, 2I] = [gate | up]; silu(x) = x / (1 + exp(-x)) with the
// exponential taken of -|x| so it never overflows.
template <typename In, typename T, typename O>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = out.size(1), stride = gate_up.stride(0);
  const Raw<In>* gp = raw<In>(gate_up);
  Raw<O>* op = raw<O>(out);
  at::parallel_for(0, rows, grain(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Raw<In>* g = gp + r * stride;
      const Raw<In>* u = g + inter;
      Raw<O>* o = op + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float x = rounded<Raw<T>>(to_float(g[i]));
        const float e = exp_nonpositive(-std::fabs(x));
        const float d = 1.f / (1.f + e);  // one division: both branches are computed, then one is kept
        const float silu = x >= 0.f ? x * d : x * e * d;
        o[i] = from_float<Raw<O>>(rounded<Raw<T>>(rounded<Raw<T>>(silu) * rounded<Raw<T>>(to_float(u[i]))));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up, at::ScalarType dtype, bool out_f32) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [T, 2 * intermediate] with contiguous rows");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(gate_up.scalar_type() == dtype || is_float(gate_up), "gate_up: dtype or float32");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options().dtype(out_f32 ? at::kFloat : dtype));
  const bool in32 = is_float(gate_up);
  if (dtype == at::kFloat) {
    silu_mul_impl<float, float, float>(gate_up, out);
  } else if (in32 && out_f32) {
    silu_mul_impl<float, c10::BFloat16, float>(gate_up, out);
  } else if (in32) {
    silu_mul_impl<float, c10::BFloat16, c10::BFloat16>(gate_up, out);
  } else if (out_f32) {
    silu_mul_impl<c10::BFloat16, c10::BFloat16, float>(gate_up, out);
  } else {
    silu_mul_impl<c10::BFloat16, c10::BFloat16, c10::BFloat16>(gate_up, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool out_f32=False) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, float eps, bool out_f32=False) -> Tensor");
  m.def("rotary_qkv_(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) -> ()");
  m.def("rotary_qkv_cast(Tensor qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) -> Tensor");
  m.def("silu_mul(Tensor gate_up, ScalarType dtype, bool out_f32=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_qkv_", &rotary_qkv_);
  m.impl("rotary_qkv_cast", &rotary_qkv_cast);
  m.impl("silu_mul", &silu_mul);
}

}  // namespace meshserve
