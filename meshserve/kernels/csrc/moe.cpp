// Fused MoE experts: gate_up GEMM + SiLU-mul, down GEMM, routing-weight combine, in one op.
//
// Torch oracle: meshserve/kernels/fused_moe.py (moe_reference); weight packing: pack_expert_weight there.
// Token-expert pairs are counting-sorted by expert; tasks (expert, block of <= kRowBlock pairs, block of 64
// output columns) run across threads with at::parallel_for. A task reads its token rows by index (no packed,
// zero-filled copy of the activations) and multiplies them with one packed weight block, accumulating in
// float32: bfloat16 pairs through AVX512-BF16 dot products where the CPU has them, else widened to float32.
// Gate and up columns are interleaved per block (32 + 32), so SiLU(gate) * up is the first GEMM's epilogue;
// the routing weight scales the second GEMM's epilogue, and a last pass adds each token's k rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fast_exp.h"

namespace meshserve {
namespace {

constexpr int64_t kCols = 64;      // output columns per packed weight block: 4 vectors of 16 float32
constexpr int64_t kMaxRows = 6;    // rows per micro-tile: 6 x 4 accumulators + 4 weight vectors fit 32 zmm
constexpr int64_t kRowBlock = 48;  // pairs per task: a multiple of kMaxRows, small enough to balance threads

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}


// c[r][0..64) = a[r] . packed block, r < MR. bfloat16 block layout [K/2][64][2]: a k-pair of 64 columns.
template <int MR>
void tile_bf16(const uint16_t* const* a, const uint16_t* b, int64_t k, float* c) {
  const int64_t k2 = k / 2;
#if defined(__AVX512BF16__)
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k2; ++kk) {
    const uint16_t* bk = b + kk * 2 * kCols;
    __m512bh bv[4];
    for (int j = 0; j < 4; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(bk + 32 * j);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a[r] + 2 * kk, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + r * kCols + 16 * j, acc[r][j]);
#elif defined(__AVX512F__)
  // No BF16 dot product: widen each pair's even (low) and odd (high) halves to float32 and FMA both.
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t kk = 0; kk < k2; ++kk) {
    const uint16_t* bk = b + kk * 2 * kCols;
    __m512 even[4], odd[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(bk + 32 * j);
      even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      odd[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 a0 = _mm512_set1_ps(bf16_to_float(a[r][2 * kk]));
      const __m512 a1 = _mm512_set1_ps(bf16_to_float(a[r][2 * kk + 1]));
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(a1, odd[j], _mm512_fmadd_ps(a0, even[j], acc[r][j]));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + r * kCols + 16 * j, acc[r][j]);
#else
  std::fill(c, c + MR * kCols, 0.f);
  for (int64_t kk = 0; kk < k2; ++kk) {
    const uint16_t* bk = b + kk * 2 * kCols;
    for (int r = 0; r < MR; ++r) {
      const float a0 = bf16_to_float(a[r][2 * kk]), a1 = bf16_to_float(a[r][2 * kk + 1]);
      for (int64_t col = 0; col < kCols; ++col)
        c[r * kCols + col] += a0 * bf16_to_float(bk[2 * col]) + a1 * bf16_to_float(bk[2 * col + 1]);
    }
  }
#endif
}

// c[r][0..64) = a[r] . packed block, r < MR. float32 block layout [K][64].
template <int MR>
void tile_f32(const float* const* a, const float* b, int64_t k, float* c) {
#if defined(__AVX512F__)
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[4];
    for (int j = 0; j < 4; ++j) bv[j] = _mm512_loadu_ps(b + kk * kCols + 16 * j);
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r][kk]);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + r * kCols + 16 * j, acc[r][j]);
#else
  std::fill(c, c + MR * kCols, 0.f);
  for (int64_t kk = 0; kk < k; ++kk)
    for (int r = 0; r < MR; ++r)
      for (int64_t col = 0; col < kCols; ++col) c[r * kCols + col] += a[r][kk] * b[kk * kCols + col];
#endif
}

template <typename T>
void tile(const T* const* a, const T* b, int64_t k, int64_t rows, float* c) {
  using Raw = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
  auto run = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    if constexpr (std::is_same_v<T, float>)
      tile_f32<MR>(a, b, k, c);
    else
      tile_bf16<MR>(reinterpret_cast<const Raw* const*>(a), reinterpret_cast<const Raw*>(b), k, c);
  };
  switch (rows) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    default: run(std::integral_constant<int, 6>{}); break;
  }
}

// n float32 values to T (bfloat16: round to nearest even, as torch's own conversion).
template <typename T>
inline void store(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t i = 0;
#if defined(__AVX512BF16__)
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

struct Block {
  int64_t expert, first, rows;  // pairs [first, first + rows) of the expert-sorted order
};

// The rows of blk (row(p): pair p's input row) times one packed block, in micro-tiles of kMaxRows;
// done(p, c) receives pair p's 64 float32 results.
template <typename T, typename Row, typename Done>
void run_block(const Block& blk, const T* b, int64_t k, Row row, Done done) {
  const T* a[kMaxRows];
  float c[kMaxRows * kCols];
  for (int64_t m = 0; m < blk.rows; m += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, blk.rows - m);
    for (int64_t r = 0; r < rows; ++r) a[r] = row(blk.first + m + r);
    tile<T>(a, b, k, rows, c);
    for (int64_t r = 0; r < rows; ++r) done(blk.first + m + r, c + r * kCols);
  }
}

template <typename T>
at::Tensor fused_moe_impl(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                          const at::Tensor& w13, const at::Tensor& w2) {
  const int64_t tokens = x.size(0), hidden = x.size(1), k = topk_ids.size(1);
  const int64_t experts = w13.size(0), inter = w13.size(1) * kCols / 2, hidden_pad = w2.size(1) * kCols;
  const int64_t pairs = tokens * k, blocks13 = w13.size(1), blocks2 = w2.size(1);

  // Counting sort of pairs by expert (stable: token order within an expert).
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  const float* route_w = topk_weights.data_ptr<float>();
  std::vector<int64_t> start(experts + 1, 0), pos(pairs), token_of(pairs);
  std::vector<float> weight_of(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < experts, "fused_moe: expert id ", ids[p], " outside [0, ", experts, ")");
    ++start[ids[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t s = fill[ids[p]]++;
    pos[p] = s;
    token_of[s] = p / k;
    weight_of[s] = route_w[p];
  }
  std::vector<Block> blocks;
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t f = start[e]; f < start[e + 1]; f += kRowBlock)
      blocks.push_back({e, f, std::min(kRowBlock, start[e + 1] - f)});
  const int64_t nblocks = static_cast<int64_t>(blocks.size());

  const T* xs = x.data_ptr<T>();
  const T* w13s = w13.data_ptr<T>();
  const T* w2s = w2.data_ptr<T>();
  at::Tensor act = at::empty({pairs, inter}, x.options());
  at::Tensor pair_out = at::empty({pairs, hidden_pad}, x.options().dtype(at::kFloat));
  T* acts = act.data_ptr<T>();
  float* outs = pair_out.data_ptr<float>();

  // gate_up: task = (row block, column block of 32 gate + 32 up columns); epilogue SiLU(gate) * up.
  at::parallel_for(0, nblocks * blocks13, 1, [&](int64_t begin, int64_t end) {
    float act_row[kCols / 2];
    for (int64_t task = begin; task < end; ++task) {
      const Block& blk = blocks[task / blocks13];
      const int64_t nb = task % blocks13;
      const T* b = w13s + (blk.expert * blocks13 + nb) * hidden * kCols;
      run_block<T>(blk, b, hidden, [&](int64_t p) { return xs + token_of[p] * hidden; },
                   [&](int64_t p, const float* g) {
                     for (int64_t col = 0; col < kCols / 2; ++col)
                       act_row[col] = g[col] / (1.f + exp_clamped(-g[col])) * g[kCols / 2 + col];
                     store<T>(act_row, acts + p * inter + nb * kCols / 2, kCols / 2);
                   });
    }
  });

  // down: task = (row block, column block of 64 hidden columns); epilogue scales by the routing weight.
  at::parallel_for(0, nblocks * blocks2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const Block& blk = blocks[task / blocks2];
      const int64_t nb = task % blocks2;
      const T* b = w2s + (blk.expert * blocks2 + nb) * inter * kCols;
      run_block<T>(blk, b, inter, [&](int64_t p) { return acts + p * inter; },
                   [&](int64_t p, const float* y) {
                     float* dst = outs + p * hidden_pad + nb * kCols;
                     for (int64_t col = 0; col < kCols; ++col) dst[col] = y[col] * weight_of[p];
                   });
    }
  });

  // Combine: each token's k weighted rows, summed in float32, rounded once.
  at::Tensor out = at::empty({tokens, hidden}, x.options());
  T* os = out.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(hidden);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float* row = outs + pos[t * k + j] * hidden_pad;
        for (int64_t h = 0; h < hidden; ++h) sum[h] += row[h];
      }
      store<T>(sum.data(), os + t * hidden, hidden);
    }
  });
  return out;
}

at::Tensor fused_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                     const at::Tensor& w13, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fused_moe: x must be a contiguous [tokens, hidden] tensor");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_ids.is_contiguous() && topk_ids.dim() == 2 &&
                  topk_ids.size(0) == x.size(0), "fused_moe: topk_ids must be contiguous int64 [tokens, k]");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous() &&
                  topk_weights.sizes() == topk_ids.sizes(), "fused_moe: topk_weights must be float32 like topk_ids");
  TORCH_CHECK(w13.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "fused_moe: packed weights must have x's dtype");
  TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous() && w13.dim() == 4 && w2.dim() == 4 &&
                  w13.size(0) == w2.size(0) && w13.size(2) * w13.size(3) == x.size(1) * kCols &&
                  w2.size(2) * w2.size(3) == w13.size(1) * kCols / 2 * kCols && w2.size(1) * kCols >= x.size(1),
              "fused_moe: packed weights do not match x (pack them with fused_moe.pack_experts)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.size(1) % 2 == 0, "fused_moe: bfloat16 needs an even hidden size");
  if (x.scalar_type() == at::kFloat) return fused_moe_impl<float>(x, topk_ids, topk_weights, w13, w2);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fused_moe: float32 or bfloat16 only");
  return fused_moe_impl<at::BFloat16>(x, topk_ids, topk_weights, w13, w2);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("fused_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w2) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("fused_moe", &fused_moe); }

}  // namespace meshserve
