// bf16_linear: y = x @ W.T (+ bias) for a bfloat16 weight pair-packed once at load (bf16_dot_tile.h).
//
// Torch oracle: F.linear in float32 of the same bf16 values (meshserve/kernels/bf16_gemm.py).
// Tasks are (block of kRowBlock rows, panel of 16 * kTileCols columns), panel-major so one thread's
// consecutive tasks reuse a panel from its L2; at::parallel_for deals them. Inside a task the K pairs run
// in blocks of kPairBlock (the panel block stays in L1 while every row group of the task passes over it),
// accumulating in a float32 task buffer; the epilogue adds the bias and stores float32 or bfloat16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "bf16_bits.h"
#include "bf16_dot_tile.h"

namespace meshserve {
namespace {

using bf16_tile::kBlockCols;
using bf16_tile::kTileCols;
using bf16_tile::kTileRows;

constexpr int64_t kPanelCols = kBlockCols * kTileCols;  // 48 output columns per task
constexpr int64_t kRowBlock = 8 * kTileRows;             // 64 rows per task
constexpr int64_t kPairBlock = 64;                       // k-pairs per K block: 6 KiB packed, 24 KiB widened
// Float32 tasks of at least this many rows widen each panel block once (into L1) and run the plain float32
// tile: widening in registers costs ~1/R of the FMAs, widening once ~1/rows. On the 2-core box (1 thread,
// gate_up 2816x512, load ~5) in-register widening won at 16 rows (122 vs 101 GFLOP/s) and widening once
// at 64 (135-142 vs 125); 32 lies between (not timed on its own). 128- and 32-pair blocks were no better.
constexpr int64_t kWideRows = 32;
// Weight pairs one row group asks for ahead of use (2 KiB of each column block's stream). Decode-sized M left
// to the hardware prefetcher read 24-38 GB/s; with this, M = 1-8 44-67, and M = 12-16, whose two row groups
// take turns at the next block, 38-46 (2 threads, 1B shapes, docs/kernels.md); 16 and 64 were no better.
constexpr int64_t kPrefetchPairs = 32;

template <typename A, typename O>
void bf16_linear_impl(const A* xs, int64_t lda, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                      const float* bias, O* out) {
  const int64_t k2 = (k + 1) / 2, wstride = bf16_tile::kPairStride(k2);
  const int64_t col_blocks = (n + kBlockCols - 1) / kBlockCols;
  const int64_t panels = (col_blocks + kTileCols - 1) / kTileCols;
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, panels * row_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kRowBlock * kPanelCols];
    std::vector<float> wf(2 * kPairBlock * kPanelCols);  // a widened panel block (wide tasks)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task / row_blocks, row0 = (task % row_blocks) * kRowBlock;
      const int64_t rows = std::min(kRowBlock, m - row0);
      const int cblocks = static_cast<int>(std::min<int64_t>(kTileCols, col_blocks - panel * kTileCols));
      const uint16_t* wp = w + panel * kTileCols * wstride;
      const bool wide = std::is_same_v<A, float> && rows >= kWideRows;
      for (int64_t kk0 = 0; kk0 < k2; kk0 += kPairBlock) {
        const int64_t kk1 = std::min(k2, kk0 + kPairBlock);
        const bool odd_tail = (k % 2) && kk1 == k2;
        if (wide) bf16_tile::run_widen(cblocks, wp, wstride, kk0, kk1, wf.data());
        const int64_t groups = (rows + kTileRows - 1) / kTileRows;  // row groups sharing the block's prefetch
        for (int64_t r = 0; r < rows; r += kTileRows) {
          const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
          const A* a = xs + (row0 + r) * lda;
          float* c = acc + r * kPanelCols;
          if constexpr (std::is_same_v<A, float>) {
            if (wide) {
              bf16_tile::run_tile_f32(tile_rows, cblocks, a + 2 * kk0, lda, wf.data(),
                                      std::min(2 * kk1, k) - 2 * kk0, c, kPanelCols, kk0 > 0);
              continue;
            }
          }
          // One row group asks kPrefetchPairs ahead; several take turns at the next block's pairs (a pair of
          // this block is already loaded by the first group when a later one passes it).
          const bf16_tile::Prefetch pf{groups > 1 ? kPairBlock : kPrefetchPairs, r / kTileRows, groups};
          bf16_tile::run_tile<A>(tile_rows, cblocks, a, lda, wp, wstride, kk0, kk1, odd_tail, c, kPanelCols,
                                 kk0 > 0, pf);
        }
      }
      const int64_t col0 = panel * kPanelCols, cols = std::min(kPanelCols, n - col0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = acc + r * kPanelCols;
        O* dst = out + (row0 + r) * n + col0;
        for (int64_t c = 0; c < cols; ++c) {
          const float v = src[c] + (bias ? bias[col0 + c] : 0.f);
          if constexpr (sizeof(O) == 4) dst[c] = v; else dst[c] = float_to_bits(v);
        }
      }
    }
  });
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                       const c10::optional<at::Tensor>& bias, bool out_f32, bool dpbf16) {
  TORCH_CHECK(x.dim() == 2, "bf16_linear: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "bf16_linear: x must be float32 or bfloat16");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(1) == (k + 1) / 2 && packed.size(2) == 2 * kBlockCols &&
                  packed.size(0) == (n + kBlockCols - 1) / kBlockCols && n > 0,
              "bf16_linear: packed weight does not match x and n (pack it with bf16_gemm.pack_bf16_pairs)");
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bf16_linear: bias must be [n]");
    b32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({m, n}, x.options().dtype(out_f32 ? at::kFloat : at::kBFloat16));
  if (m == 0) return out;
  // The FMA tile wants float32 activations, the dpbf16 tile bfloat16 ones (bf16 values either way).
  at::Tensor a = x.to(dpbf16 ? at::kBFloat16 : at::kFloat);
  if (a.stride(1) != 1) a = a.contiguous();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const float* bs = b32.defined() ? b32.data_ptr<float>() : nullptr;
  auto run = [&](auto* xs) {
    if (out_f32)
      bf16_linear_impl(xs, a.stride(0), m, k, w, n, bs, out.data_ptr<float>());
    else
      bf16_linear_impl(xs, a.stride(0), m, k, w, n, bs,
                       reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  };
  if (dpbf16)
    run(reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>()));
  else
    run(a.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, int n, Tensor? bias=None, bool out_f32=False, "
        "bool dpbf16=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("bf16_linear", &bf16_linear); }

}  // namespace meshserve
