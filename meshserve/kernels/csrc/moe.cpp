// Fused MoE experts: gate_up GEMM + SiLU-mul, down GEMM, routing-weight combine, in one op.
//
// Torch oracle: meshserve/kernels/fused_moe.py (moe_reference); weight packing: pack_experts there.
// Token-expert pairs are counting-sorted by expert; tasks (expert, block of <= kRowBlock pairs, block of 64
// output columns) are dealt to threads largest first, accumulating in float32.
// float32: a task reads its token rows by index (no packed, zero-filled copy of the activations) and runs
// the FMA tile below on a [K][64] weight block.
// bfloat16: the weights are packed once in the shared pair layout of csrc/bf16_dot_tile.h (16 columns per
// block, k-pairs side by side) and every task runs its FMA tile, which widens each weight vector to float32
// in registers (no widened copy of a block); its rows are float32 copies of the bfloat16 inputs, in
// expert-sorted order so a block's rows are contiguous, as the tile reads them. On this machine kind
// vdpbf16ps has half the float32 FMA's flop rate (bf16_dot_tile.h), so the dot-product tile is not used.
// Products of bfloat16 values are exact in float32, so the paths differ only in float32 summation order.
// Gate and up columns are interleaved per block (32 + 32), so SiLU(gate) * up is the first GEMM's epilogue;
// the routing weight scales the second GEMM's epilogue, and a last pass adds each token's k rows.
// bfloat16 with brgemm=True (AMX machines, fused_moe.py decides): the same tasks run PyTorch's oneDNN
// micro-kernel (at::native::cpublas::brgemm: AMX tiles there, AVX-512 elsewhere) on bfloat16 rows; the pair
// layout of a 16-column block is brgemm's VNNI B layout with ld_b = 16, so the packed weights are the same.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
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

#include "bf16_bits.h"
#include "bf16_dot_tile.h"
#include "expert_order.h"
#include "fast_exp.h"

namespace meshserve {
namespace {

constexpr int64_t kCols = 64;      // output columns per packed weight block: 4 vectors of 16 float32
constexpr int64_t kMaxRows = 6;    // float32 rows per micro-tile: 6 x 4 accumulators + 4 weight vectors fit 32 zmm
constexpr int64_t kRowBlock = 96;  // most pairs per task: whole micro-tiles of both dtypes (6 and 8 rows)
constexpr int64_t kPairRows = bf16_tile::kTileRows;  // bfloat16 rows per micro-tile

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

// tile_f32 for 1..kMaxRows rows.
void tile(const float* const* a, const float* b, int64_t k, int64_t rows, float* c) {
  switch (rows) {
    case 1: tile_f32<1>(a, b, k, c); break;
    case 2: tile_f32<2>(a, b, k, c); break;
    case 3: tile_f32<3>(a, b, k, c); break;
    case 4: tile_f32<4>(a, b, k, c); break;
    case 5: tile_f32<5>(a, b, k, c); break;
    default: tile_f32<6>(a, b, k, c); break;
  }
}

// c[r][0..64) = a[r] . one 64-column block of pair-packed bfloat16 weights (4 blocks of 16 columns, k2 pairs
// each), r < rows <= kPairRows; a: float32 rows lda apart. Two tiles of 2 x 16 columns (16 accumulators).
inline void tile_pairs(const float* a, int64_t lda, const uint16_t* w, int64_t k2, int64_t rows, float* c) {
  const int64_t stride = bf16_tile::kPairStride(k2);
  for (int64_t half = 0; half < 2; ++half)
    bf16_tile::run_tile<float>(static_cast<int>(rows), 2, a, lda, w + 2 * half * stride, stride, 0, k2, false,
                               c + 2 * half * bf16_tile::kBlockCols, kCols, false);
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

using expert_order::Block;

// The rows of blk (row(p): pair p's float32 input row) times one packed float32 block [k][64], in
// micro-tiles of kMaxRows (the block, 64-90 KB here, stays in L2 while the task's micro-tiles reuse it);
// done(p, c) receives pair p's 64 float32 results.
template <typename Row, typename Done>
void run_block(const Block& blk, const float* b, int64_t k, Row row, Done done) {
  const float* a[kMaxRows];
  float c[kMaxRows * kCols];
  for (int64_t m = 0; m < blk.rows; m += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, blk.rows - m);
    for (int64_t r = 0; r < rows; ++r) a[r] = row(blk.first + m + r);
    tile(a, b, k, rows, c);
    for (int64_t r = 0; r < rows; ++r) done(blk.first + m + r, c + r * kCols);
  }
}

// The same for bfloat16 weights: blk's rows are rows [first, first + rows) of `sorted` (float32, lda apart),
// the block pair-packed (tile_pairs), in micro-tiles of kPairRows.
template <typename Done>
void run_pair_block(const Block& blk, const uint16_t* w, int64_t k, const float* sorted, int64_t lda, Done done) {
  float c[kPairRows * kCols];
  for (int64_t m = 0; m < blk.rows; m += kPairRows) {
    const int64_t rows = std::min(kPairRows, blk.rows - m);
    tile_pairs(sorted + (blk.first + m) * lda, lda, w, k / 2, rows, c);
    for (int64_t r = 0; r < rows; ++r) done(blk.first + m + r, c + r * kCols);
  }
}

// The same through brgemm: blk's rows are bfloat16 rows of `sorted` (lda apart), one call per 16-column
// block of the 64 (each block [k/2][16][2] = VNNI with ld_b 16), in calls of <= kBrgemmRows rows.
constexpr int64_t kBrgemmRows = 32;  // bounds the micro-kernels oneDNN generates (one per row count)
template <typename Done>
void run_brgemm_block(const Block& blk, const uint16_t* w, int64_t k, const uint16_t* sorted, int64_t lda,
                      Done done) {
  alignas(64) float c[kBrgemmRows * kCols];
  const int64_t stride = bf16_tile::kPairStride(k / 2);
  const auto* a = reinterpret_cast<const at::BFloat16*>(sorted);
  const auto* b = reinterpret_cast<const at::BFloat16*>(w);
  for (int64_t m = 0; m < blk.rows; m += kBrgemmRows) {
    const int64_t rows = std::min(kBrgemmRows, blk.rows - m);
    for (int64_t q = 0; q < kCols / bf16_tile::kBlockCols; ++q)
      at::native::cpublas::brgemm(rows, bf16_tile::kBlockCols, k, lda, bf16_tile::kBlockCols, kCols, false,
                                  a + (blk.first + m) * lda, b + q * stride, c + q * bf16_tile::kBlockCols,
                                  /*is_vnni=*/true);
    for (int64_t r = 0; r < rows; ++r) done(blk.first + m + r, c + r * kCols);
  }
}

// Runs task(i) for i in [0, n) across torch's threads, each taking the next index when it is free (tasks
// listed costliest first balance like a greedy longest-first schedule). amx: release the tile state after.
template <typename Task>
void deal(int64_t n, Task task, bool amx = false) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) task(i);
    if (amx) at::native::cpublas::brgemm_release();
  });
}

template <typename T>
at::Tensor fused_moe_impl(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                          const at::Tensor& w13, const at::Tensor& w2, bool brgemm) {
  const int64_t tokens = x.size(0), hidden = x.size(1), k = topk_ids.size(1);
  const int64_t experts = w13.size(0), inter = w13.size(1) * kCols / 2, hidden_pad = w2.size(1) * kCols;
  const int64_t pairs = tokens * k, blocks13 = w13.size(1), blocks2 = w2.size(1);

  const auto [start, pos, token_of, weight_of] = expert_order::sort_by_expert(
      topk_ids.data_ptr<int64_t>(), topk_weights.data_ptr<float>(), tokens, k, experts, "fused_moe");
  // Each expert's pairs in near-equal blocks of <= kRowBlock (whole micro-tiles but the last), largest first.
  constexpr bool kBf16 = !std::is_same_v<T, float>;
  constexpr int64_t unit = kBf16 ? kPairRows : kMaxRows;
  const std::vector<Block> blocks = expert_order::row_blocks(start, kRowBlock, unit);
  const int64_t nblocks = static_cast<int64_t>(blocks.size());

  const T* xs = x.data_ptr<T>();
  const T* w13s = w13.data_ptr<T>();
  const T* w2s = w2.data_ptr<T>();
  // Activations between the GEMMs, float32 (bfloat16 models: values rounded to bfloat16, as the reference).
  at::Tensor act = at::empty({pairs, inter}, x.options().dtype(at::kFloat));
  at::Tensor pair_out = at::empty({pairs, hidden_pad}, x.options().dtype(at::kFloat));
  float* acts = act.data_ptr<float>();
  float* outs = pair_out.data_ptr<float>();
  // bfloat16: the input rows as float32 in expert-sorted order, so each block's rows are contiguous
  // (brgemm: as bfloat16, and the activations get a bfloat16 copy too).
  const bool wide = kBf16 && !brgemm;
  at::Tensor x_sorted = kBf16 ? at::empty({pairs, hidden}, x.options().dtype(wide ? at::kFloat : at::kBFloat16))
                              : at::Tensor();
  float* xsorted = wide ? x_sorted.data_ptr<float>() : nullptr;
  uint16_t* xsorted16 = kBf16 && brgemm ? reinterpret_cast<uint16_t*>(x_sorted.data_ptr<at::BFloat16>()) : nullptr;
  at::Tensor act16 = kBf16 && brgemm ? at::empty({pairs, inter}, x.options().dtype(at::kBFloat16)) : at::Tensor();
  uint16_t* acts16 = act16.defined() ? reinterpret_cast<uint16_t*>(act16.data_ptr<at::BFloat16>()) : nullptr;
  if constexpr (kBf16) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(xs);
    at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const uint16_t* src = bits + token_of[p] * hidden;
        if (xsorted16) {
          std::memcpy(xsorted16 + p * hidden, src, hidden * sizeof(uint16_t));
          continue;
        }
        float* dst = xsorted + p * hidden;
#pragma omp simd
        for (int64_t h = 0; h < hidden; ++h) dst[h] = bits_to_float(src[h]);
      }
    });
  }

  // gate_up: task = (row block, column block of 32 gate + 32 up columns); epilogue SiLU(gate) * up.
  deal(nblocks * blocks13, [&](int64_t task) {
    const Block& blk = blocks[task / blocks13];
    const int64_t nb = task % blocks13, col0 = nb * kCols / 2;
    const T* b = w13s + (blk.expert * blocks13 + nb) * hidden * kCols;
    auto done = [&](int64_t p, const float* g) {
      float* dst = acts + p * inter + col0;
      silu_mul(g, g + kCols / 2, dst);
      if constexpr (kBf16) {  // the reference rounds the activations to the model dtype
        if (acts16) {
          for (int64_t i = 0; i < kCols / 2; ++i) acts16[p * inter + col0 + i] = float_to_bits(dst[i]);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < kCols / 2; ++i) dst[i] = bits_to_float(float_to_bits(dst[i]));
        }
      }
    };
    if constexpr (kBf16) {
      if (brgemm)
        run_brgemm_block(blk, reinterpret_cast<const uint16_t*>(b), hidden, xsorted16, hidden, done);
      else
        run_pair_block(blk, reinterpret_cast<const uint16_t*>(b), hidden, xsorted, hidden, done);
    } else {
      run_block(blk, b, hidden, [&](int64_t p) { return xs + token_of[p] * hidden; }, done);
    }
  }, brgemm);

  // down: task = (row block, column block of 64 hidden columns); epilogue scales by the routing weight.
  deal(nblocks * blocks2, [&](int64_t task) {
    const Block& blk = blocks[task / blocks2];
    const int64_t nb = task % blocks2;
    const T* b = w2s + (blk.expert * blocks2 + nb) * inter * kCols;
    auto done = [&](int64_t p, const float* y) {
      float* dst = outs + p * hidden_pad + nb * kCols;
      for (int64_t col = 0; col < kCols; ++col) dst[col] = y[col] * weight_of[p];
    };
    if constexpr (kBf16) {
      if (brgemm)
        run_brgemm_block(blk, reinterpret_cast<const uint16_t*>(b), inter, acts16, inter, done);
      else
        run_pair_block(blk, reinterpret_cast<const uint16_t*>(b), inter, acts, inter, done);
    } else {
      run_block(blk, b, inter, [&](int64_t p) { return acts + p * inter; }, done);
    }
  }, brgemm);

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
                     const at::Tensor& w13, const at::Tensor& w2, bool brgemm) {
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
  if (x.scalar_type() == at::kFloat) return fused_moe_impl<float>(x, topk_ids, topk_weights, w13, w2, false);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fused_moe: float32 or bfloat16 only");
  return fused_moe_impl<at::BFloat16>(x, topk_ids, topk_weights, w13, w2, brgemm);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("fused_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w2, "
        "bool brgemm=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("fused_moe", &fused_moe); }

}  // namespace meshserve
