// quant_linear: y = x @ W.T (+ bias) for a weight-only int8 / int4 W packed once at prepare (quant_tile.h).
//
// Torch oracle: meshserve/kernels/quant_weight.py's quant_linear_reference (dequantize, then F.linear in
// float32); packing: kernels/quant_gemm.py's pack_quant. x (float32 or bfloat16 [M, K]) becomes one float32
// copy in the kernel's K order (act-order perm applied, groups zero-padded to whole units) with its group
// sums; tasks are (panel of 64 columns, block of rows), panel-major, dealt by at::parallel_for. bfloat16 x
// of at least brgemm_rows rows runs quant_brgemm.h's path (a bfloat16 scratch per K block and oneDNN's
// brgemm, blocks of up to 256 rows), anything else quant_tile.h's register tiles (blocks of 48 rows); the
// epilogue adds the bias and stores x's dtype (rounded once).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "bf16_bits.h"
#include "quant_args.h"
#include "quant_brgemm.h"
#include "quant_tile.h"

namespace meshserve {
namespace {

using quant_tile::kPanelCols;

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& perm,
                        int64_t bits, int64_t group_size, int64_t n, const c10::optional<at::Tensor>& bias,
                        int64_t brgemm_rows) {
  TORCH_CHECK(x.dim() == 2, "quant_linear: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16");
  const int64_t m = x.size(0);
  const quant_tile::Matrix w = quant_args::matrix("quant_linear", qweight, scales, zeros, perm, bits, group_size,
                                                  n, x.size(1), 0);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "quant_linear: bias must be [n] (n = ", n, ")");
    b32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  const at::Tensor pm = perm.has_value() && perm->defined() ? *perm : at::Tensor();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool brgemm = bf16 && m >= brgemm_rows;
  // The brgemm path reads bfloat16 x as it is when it is already in the kernel's K order (no act-order, no
  // group padding); every other case makes the kernel rows (float32, with group sums) first.
  const bool as_is =
      brgemm && !pm.defined() && w.padded_k() == x.size(1) && x.stride(1) == 1 && x.stride(0) >= x.size(1);
  at::Tensor a, sx, a16;
  if (as_is) {
    a16 = x;
  } else {
    std::tie(a, sx) = quant_args::kernel_rows(x, pm, w, group_size);
    // bfloat16 x: the same rows as bfloat16 bits (exact) for the pair, dot and brgemm paths
    const bool pairs = quant_tile::wants_bf16_rows(static_cast<int>(bits), m) || brgemm;
    if (bf16 && pairs) a16 = a.to(at::kBFloat16);
  }
  const float* as = a.defined() ? a.data_ptr<float>() : nullptr;
  const uint16_t* a16s = a16.defined() ? reinterpret_cast<const uint16_t*>(a16.data_ptr<at::BFloat16>()) : nullptr;
  const float* sxs = sx.defined() ? sx.data_ptr<float>() : nullptr;
  const float* bs = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const int64_t lda = as_is ? x.stride(0) : a.size(1);
  const int64_t panels = (w.blocks + quant_tile::kPanelBlocks - 1) / quant_tile::kPanelBlocks;
  const int64_t row_block = quant_brgemm::task_rows(m, panels, brgemm, at::get_num_threads());
  const int64_t row_blocks = (m + row_block - 1) / row_block;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, panels * row_blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local quant_brgemm::Scratch scratch;
    scratch.ensure(row_block, brgemm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task / row_blocks, row0 = (task % row_blocks) * row_block;
      const int64_t rows = std::min(row_block, m - row0);
      quant_brgemm::run_rows(w, panel, as ? as + row0 * lda : nullptr, a16s ? a16s + row0 * lda : nullptr, lda,
                             sxs ? sxs + row0 * w.groups : nullptr, rows, brgemm ? 0 : rows + 1, scratch);
      const int64_t col0 = panel * kPanelCols, cols = std::min(kPanelCols, n - col0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = scratch.c.data() + r * kPanelCols;
        const int64_t at = (row0 + r) * n + col0;
        for (int64_t col = 0; col < cols; ++col) {
          const float v = src[col] + (bs ? bs[col0 + col] : 0.f);
          if (ob) ob[at + col] = float_to_bits(v); else of[at + col] = v;
        }
      }
    }
    if (brgemm) at::native::cpublas::brgemm_release();  // AMX: hand the tile configuration back
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? perm, int bits, "
        "int group_size, int n, Tensor? bias=None, int brgemm_rows=9223372036854775807) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("quant_linear", &quant_linear); }

}  // namespace meshserve
