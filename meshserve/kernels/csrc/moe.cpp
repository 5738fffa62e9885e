// Fused MoE experts: gate_up GEMM + SiLU-mul, down GEMM, routing-weight combine, in one op.
//
// Torch oracle: meshserve/kernels/fused_moe.py (moe_reference); weight packing: pack_expert_weight there.
// Token-expert pairs are counting-sorted by expert; tasks (expert, block of <= kRowBlock pairs, block of 64
// output columns) are dealt to threads largest first. A task reads its token rows by index (no packed,
// zero-filled copy of the activations) and multiplies them with one packed weight block, accumulating in
// float32: bfloat16 pairs through AVX512-BF16 dot products where the CPU has them, else widened to float32.
// A bfloat16 task with many rows widens its weight block to float32 once (into a per-thread buffer that stays
// in L2) and runs the float32 tile on float32 copies of its rows: on the 2-core AVX512-BF16 machine kind the
// BF16 dot-product tile reached ~75 GFLOP/s per core and the float32 FMA tile ~110-120. Products of bfloat16
// values are exact in float32, so the two paths differ only in float32 summation order.
// Gate and up columns are interleaved per block (32 + 32), so SiLU(gate) * up is the first GEMM's epilogue;
// the routing weight scales the second GEMM's epilogue, and a last pass adds each token's k rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
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
constexpr int64_t kRowBlock = 96;  // most pairs per task (a multiple of kMaxRows): 16 micro-tiles per weight block
// bfloat16 tasks of at least this many pairs run in float32: widening a block costs about what 1-2 rows of
// dot products do, and at 24+ rows the float32 tile's speed repays it (benchmarks/kernels.py --sections moe).
constexpr int64_t kWideRows = 24;

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

// n bfloat16 values (as T) to float32; float32 sources are never widened.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// out[i] = SiLU(gate[i]) * up[i] for the 32 columns of one gate_up block.
inline void silu_mul(const float* gate, const float* up, float* out) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < kCols / 2; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp_clamped16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)),
                                            _mm512_loadu_ps(up + i)));
  }
#else
  for (int64_t i = 0; i < kCols / 2; ++i) out[i] = gate[i] / (1.f + exp_clamped(-gate[i])) * up[i];
#endif
}

struct Block {
  int64_t expert, first, rows;  // pairs [first, first + rows) of the expert-sorted order
};

// The rows of blk (row(p): pair p's input row) times one packed block [k][64], in micro-tiles of kMaxRows
// (the block, 64-90 KB here, stays in L2 while the task's micro-tiles reuse it); done(p, c) receives pair
// p's 64 float32 results.
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

// A packed bfloat16 block [k/2][64][2] as float32 [k][64] in this thread's buffer.
const float* widen_block(const uint16_t* b, int64_t k) {
  thread_local std::vector<float> buffer;
  buffer.resize(k * kCols);
  float* out = buffer.data();
  for (int64_t kk = 0; kk < k / 2; ++kk) {
    const uint16_t* src = b + kk * 2 * kCols;
    float* even = out + 2 * kk * kCols;
    float* odd = even + kCols;
#if defined(__AVX512F__)
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    for (int64_t j = 0; j < kCols / 16; ++j) {  // 16 columns' (even, odd) pairs per vector
      const __m512i v = _mm512_loadu_si512(src + 32 * j);
      _mm512_storeu_ps(even + 16 * j, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_storeu_ps(odd + 16 * j, _mm512_castsi512_ps(_mm512_and_si512(v, high)));
    }
#else
    for (int64_t col = 0; col < kCols; ++col) {
      even[col] = bf16_to_float(src[2 * col]);
      odd[col] = bf16_to_float(src[2 * col + 1]);
    }
#endif
  }
  return out;
}

// Runs task(i) for i in [0, n) across torch's threads, each taking the next index when it is free (tasks
// listed costliest first balance like a greedy longest-first schedule).
template <typename Task>
void deal(int64_t n, Task task) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) task(i);
  });
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
  // Each expert's pairs in near-equal blocks of <= kRowBlock (whole micro-tiles but the last), largest first.
  std::vector<Block> blocks;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = start[e + 1] - start[e], parts = (n + kRowBlock - 1) / kRowBlock;
    const int64_t size = parts ? ((n + parts - 1) / parts + kMaxRows - 1) / kMaxRows * kMaxRows : 0;
    for (int64_t f = start[e]; f < start[e + 1]; f += size) blocks.push_back({e, f, std::min(size, start[e + 1] - f)});
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.rows > b.rows; });
  const int64_t nblocks = static_cast<int64_t>(blocks.size());

  // Float32 copies of the inputs for the widened bfloat16 tasks (the activations stay rounded to bfloat16).
  constexpr bool kBf16 = !std::is_same_v<T, float>;
  const bool any_wide = kBf16 && nblocks > 0 && blocks.front().rows >= kWideRows;  // largest block first
  auto wide = [&](const Block& blk) { return kBf16 && blk.rows >= kWideRows; };
  const at::Tensor x32 = any_wide ? x.to(at::kFloat) : at::Tensor();
  const at::Tensor act32 = any_wide ? at::empty({pairs, inter}, x.options().dtype(at::kFloat)) : at::Tensor();
  const float* x32s = any_wide ? x32.data_ptr<float>() : nullptr;
  float* act32s = any_wide ? act32.data_ptr<float>() : nullptr;

  const T* xs = x.data_ptr<T>();
  const T* w13s = w13.data_ptr<T>();
  const T* w2s = w2.data_ptr<T>();
  at::Tensor act = at::empty({pairs, inter}, x.options());
  at::Tensor pair_out = at::empty({pairs, hidden_pad}, x.options().dtype(at::kFloat));
  T* acts = act.data_ptr<T>();
  float* outs = pair_out.data_ptr<float>();

  // gate_up: task = (row block, column block of 32 gate + 32 up columns); epilogue SiLU(gate) * up.
  deal(nblocks * blocks13, [&](int64_t task) {
    const Block& blk = blocks[task / blocks13];
    const int64_t nb = task % blocks13, col0 = nb * kCols / 2;
    const T* b = w13s + (blk.expert * blocks13 + nb) * hidden * kCols;
    auto done = [&](int64_t p, const float* g) {
      float act_row[kCols / 2];
      silu_mul(g, g + kCols / 2, act_row);
      store<T>(act_row, acts + p * inter + col0, kCols / 2);
      if (act32s) widen(acts + p * inter + col0, act32s + p * inter + col0, kCols / 2);
    };
    if (wide(blk))
      run_block<float>(blk, widen_block(reinterpret_cast<const uint16_t*>(b), hidden), hidden,
                       [&](int64_t p) { return x32s + token_of[p] * hidden; }, done);
    else
      run_block<T>(blk, b, hidden, [&](int64_t p) { return xs + token_of[p] * hidden; }, done);
  });

  // down: task = (row block, column block of 64 hidden columns); epilogue scales by the routing weight.
  deal(nblocks * blocks2, [&](int64_t task) {
    const Block& blk = blocks[task / blocks2];
    const int64_t nb = task % blocks2;
    const T* b = w2s + (blk.expert * blocks2 + nb) * inter * kCols;
    auto done = [&](int64_t p, const float* y) {
      float* dst = outs + p * hidden_pad + nb * kCols;
      for (int64_t col = 0; col < kCols; ++col) dst[col] = y[col] * weight_of[p];
    };
    if (wide(blk))
      run_block<float>(blk, widen_block(reinterpret_cast<const uint16_t*>(b), inter), inter,
                       [&](int64_t p) { return act32s + p * inter; }, done);
    else
      run_block<T>(blk, b, inter, [&](int64_t p) { return acts + p * inter; }, done);
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
