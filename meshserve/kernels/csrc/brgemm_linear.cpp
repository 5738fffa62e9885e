// brgemm_linear: y = x @ W.T (+ bias) for a bfloat16 weight packed once at load (bf16_gemm.pack_bf16_panels)
// through PyTorch's oneDNN micro-kernel wrapper at::native::cpublas::brgemm: AMX tiles on CPUs with
// amx_bf16, AVX-512 elsewhere (oneDNN picks the ISA at run time; PyTorch's CPU flash attention relies on
// the same wrapper).
//
// Torch oracle: F.linear in float32 of the same bf16 values (meshserve/kernels/bf16_gemm.py).
// The weight is packed in panels of 64 output columns, each panel brgemm's VNNI B layout [K/2][64][2]
// (ld_b = 64; 64 columns per call ran ~2x faster than 16 on the AVX-512 path). Tasks are (block of
// kRowBlock rows, panel), panel-major so one thread's consecutive tasks reuse a panel from its L2; rows per
// call stay <= kRowBlock so a layer needs at most kRowBlock micro-kernels (oneDNN generates and caches one
// per shape).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "bf16_bits.h"

namespace meshserve {
namespace {

constexpr int64_t kPanelCols = 64;  // bf16_gemm.PANEL_COLS
constexpr int64_t kRowBlock = 32;
// K per call: a 64 x 2048 bf16 panel chunk (256 KB) stays in L2 while oneDNN walks the rows over it in
// register blocks; the whole panel of a K = 8192 layer (1 MB) did not, and down 2048x8192 ran 1.2-1.4x
// slower than oneDNN's own bf16 GEMM at M = 64-256 (benchmarks/bf16_gemm.py --shapes llama-1b).
constexpr int64_t kKBlock = 2048;

template <typename O>
void brgemm_linear_impl(const at::BFloat16* a, int64_t lda, int64_t m, int64_t kp, const at::BFloat16* w,
                        int64_t n, const float* bias, O* out) {
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, panels * row_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kRowBlock * kPanelCols];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task / row_blocks, row0 = (task % row_blocks) * kRowBlock;
      const int64_t rows = std::min(kRowBlock, m - row0);
      for (int64_t k0 = 0; k0 < kp; k0 += kKBlock)  // k0 even: a chunk starts at k-pair k0 / 2
        at::native::cpublas::brgemm(rows, kPanelCols, std::min(kKBlock, kp - k0), lda, kPanelCols, kPanelCols,
                                    /*add_C=*/k0 > 0, a + row0 * lda + k0, w + (panel * kp + k0) * kPanelCols,
                                    acc, /*is_vnni=*/true);
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
    at::native::cpublas::brgemm_release();  // AMX: hand the tile configuration back
  });
}

at::Tensor brgemm_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                         const c10::optional<at::Tensor>& bias, bool out_f32) {
  TORCH_CHECK(x.dim() == 2, "brgemm_linear: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "brgemm_linear: x must be float32 or bfloat16");
  const int64_t m = x.size(0), k = x.size(1), kp = 2 * ((k + 1) / 2);
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(1) == kp / 2 && packed.size(2) == 2 * kPanelCols &&
                  packed.size(0) == (n + kPanelCols - 1) / kPanelCols && n > 0,
              "brgemm_linear: packed weight does not match x and n (pack it with bf16_gemm.pack_bf16_panels)");
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "brgemm_linear: bias must be [n]");
    b32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({m, n}, x.options().dtype(out_f32 ? at::kFloat : at::kBFloat16));
  if (m == 0) return out;
  at::Tensor a = x.to(at::kBFloat16);
  if (kp != k) a = at::constant_pad_nd(a, {0, kp - k});  // meets the packed weight's zero k-pair tail
  if (a.stride(1) != 1) a = a.contiguous();
  const at::BFloat16* w = packed.data_ptr<at::BFloat16>();
  const float* bs = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (out_f32)
    brgemm_linear_impl(a.data_ptr<at::BFloat16>(), a.stride(0), m, kp, w, n, bs, out.data_ptr<float>());
  else
    brgemm_linear_impl(a.data_ptr<at::BFloat16>(), a.stride(0), m, kp, w, n, bs,
                       reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("brgemm_linear(Tensor x, Tensor packed, int n, Tensor? bias=None, bool out_f32=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("brgemm_linear", &brgemm_linear); }

}  // namespace meshserve
