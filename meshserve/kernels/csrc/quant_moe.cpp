// quant_moe: fused_moe (csrc/moe.cpp) over weight-only int8 / int4 experts: every routed expert of a step
// in one call, w13 [E, 2I, H] ([gate; up]) and w2 [E, H, I] packed by kernels/quant_gemm.py's pack_quant.
//
// Torch oracle: kernels/quant_gemm.py's quant_moe_reference. Token-expert pairs are counting-sorted by
// expert (stable); each pair's input becomes a kernel row in expert order (the expert's act-order perm
// applied, groups padded, group sums: quant_args.h), so an expert's rows are contiguous. Tasks (expert,
// block of pairs, panel of 64 output columns) are dealt to threads largest first: a block of bfloat16 rows
// with at least brgemm_rows pairs runs quant_brgemm.h's path (blocks of up to 256 pairs), others quant_tile.h's
// register tiles (48 rows a call). gate_up writes float32 [pairs, 2I]; SiLU(gate) * up is rounded to x's dtype (as the
// reference) and becomes the down GEMM's kernel rows; down's epilogue scales by the routing weight; a last
// pass adds each token's k rows in float32 and rounds once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bf16_bits.h"
#include "expert_order.h"
#include "fast_exp.h"
#include "quant_args.h"
#include "quant_brgemm.h"
#include "quant_tile.h"

namespace meshserve {
namespace {

using quant_tile::kPanelCols;

using expert_order::Block;

// Runs task(i) for i in [0, n) across torch's threads, each taking the next index when it is free.
// amx: release brgemm's tile state after (AMX machines).
template <typename Task>
void deal(int64_t n, Task task, bool amx = false) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) task(i);
    if (amx) at::native::cpublas::brgemm_release();
  });
}

struct Weight {
  std::vector<quant_tile::Matrix> experts;
  const int64_t* perm;  // [E, K] or null
  int64_t k, group_size;
  const int64_t* perm_of(int64_t e) const { return perm ? perm + e * k : nullptr; }
  int64_t panels() const {
    return (experts[0].blocks + quant_tile::kPanelBlocks - 1) / quant_tile::kPanelBlocks;
  }
};

Weight weight(const char* name, const at::Tensor& q, const at::Tensor& s, const c10::optional<at::Tensor>& z,
              const c10::optional<at::Tensor>& p, int64_t bits, int64_t gs, int64_t n, int64_t k) {
  TORCH_CHECK(q.dim() == 4, "quant_moe: ", name, " must be a stack of experts (packed [E, ...])");
  Weight w{{}, p.has_value() && p->defined() ? p->data_ptr<int64_t>() : nullptr, k, gs};
  for (int64_t e = 0; e < q.size(0); ++e) w.experts.push_back(quant_args::matrix(name, q, s, z, p, bits, gs, n, k, e, true));
  return w;
}

// For each block, for each panel of w: quant_brgemm::run_rows on the block's kernel rows a [pairs][lda] (a16:
// as bfloat16 bits when the rows are bfloat16 values, else undefined; sx [pairs][G]); done(pair, col0, cols,
// c) receives each pair's float32 results for columns [col0, col0 + cols).
template <typename Done>
void run_experts(const Weight& w, const std::vector<Block>& blocks, const at::Tensor& a, const at::Tensor& a16,
                 const at::Tensor& sx, int64_t brgemm_rows, Done done) {
  const int64_t panels = w.panels(), n = w.experts[0].n, lda = w.experts[0].padded_k(), g = w.experts[0].groups;
  const int64_t tasks = static_cast<int64_t>(blocks.size()) * panels;
  const float* as = a.data_ptr<float>();
  const float* sxs = sx.data_ptr<float>();
  const uint16_t* a16s = a16.defined() ? reinterpret_cast<const uint16_t*>(a16.data_ptr<at::BFloat16>()) : nullptr;
  int64_t most = 0;
  for (const Block& blk : blocks) most = std::max(most, blk.rows);
  const bool brgemm = a16s && most >= brgemm_rows;
  deal(tasks, [&](int64_t task) {
    thread_local quant_brgemm::Scratch scratch;
    scratch.ensure(most, brgemm);
    const Block& blk = blocks[task / panels];
    const int64_t panel = task % panels, col0 = panel * kPanelCols, cols = std::min(kPanelCols, n - col0);
    quant_brgemm::run_rows(w.experts[blk.expert], panel, as + blk.first * lda,
                           a16s ? a16s + blk.first * lda : nullptr, lda, sxs + blk.first * g, blk.rows, brgemm_rows,
                           scratch);
    for (int64_t r = 0; r < blk.rows; ++r) done(blk.first + r, col0, cols, scratch.c.data() + r * kPanelCols);
  }, brgemm);
}

// Kernel rows of w for pairs in expert order: row p from src(p) (T values), expert expert_of(p).
template <typename T, typename Src>
std::tuple<at::Tensor, at::Tensor> expert_rows(const Weight& w, const std::vector<Block>& blocks, int64_t pairs,
                                               Src src) {
  const quant_tile::Matrix& m0 = w.experts[0];
  at::Tensor a = at::empty({pairs, m0.padded_k()}, at::kFloat);
  at::Tensor sx = at::empty({pairs, m0.groups}, at::kFloat);
  float* as = a.data_ptr<float>();
  float* sxs = sx.data_ptr<float>();
  deal(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const Block& blk = blocks[i];
    for (int64_t p = blk.first; p < blk.first + blk.rows; ++p)
      quant_args::kernel_row<T>(src(p), w.perm_of(blk.expert), w.experts[blk.expert], w.group_size,
                                as + p * m0.padded_k(), sxs + p * m0.groups);
  });
  return {a, sx};
}

template <typename T>
at::Tensor quant_moe_impl(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                          const Weight& w13, const Weight& w2, int64_t brgemm_rows) {
  const int64_t tokens = x.size(0), hidden = x.size(1), k = topk_ids.size(1), pairs = tokens * k;
  const int64_t experts = static_cast<int64_t>(w13.experts.size()), inter = w2.k;
  const auto [start, pos, token_of, weight_of] = expert_order::sort_by_expert(
      topk_ids.data_ptr<int64_t>(), topk_weights.data_ptr<float>(), tokens, k, experts, "quant_moe");
  // bfloat16 rows that may reach brgemm_rows in one expert: blocks of up to kTaskRows pairs
  const bool wide = !std::is_same_v<T, float> && pairs >= brgemm_rows;
  const std::vector<Block> blocks = expert_order::row_blocks(
      start, wide ? quant_brgemm::kTaskRows : quant_brgemm::kRegisterRows, 1);

  using Bits = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
  const Bits* xs = reinterpret_cast<const Bits*>(x.data_ptr<T>());
  // gate_up
  at::Tensor a13, sx13;
  std::tie(a13, sx13) = expert_rows<Bits>(w13, blocks, pairs, [&](int64_t p) { return xs + token_of[p] * hidden; });
  at::Tensor h = at::empty({pairs, 2 * inter}, at::kFloat);
  float* hs = h.data_ptr<float>();
  // bfloat16 rows (x's values, and the rounded activations below) also go to the dot path as bfloat16 bits
  const bool dot =
      !std::is_same_v<T, float> && (quant_tile::wants_bf16_rows(w13.experts[0].bits, pairs) || wide);
  run_experts(w13, blocks, a13, dot ? a13.to(at::kBFloat16) : at::Tensor(), sx13, brgemm_rows,
              [&](int64_t p, int64_t col0, int64_t cols, const float* c) {
                std::copy(c, c + cols, hs + p * 2 * inter + col0);
              });
  // SiLU(gate) * up, rounded to x's dtype as the reference does, in place over the gate half
  at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* gate = hs + p * 2 * inter;
      const float* up = gate + inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float v = gate[i] / (1.f + exp_clamped(-gate[i])) * up[i];
        gate[i] = std::is_same_v<T, float> ? v : bits_to_float(float_to_bits(v));
      }
    }
  });
  // down, scaled by the routing weight
  at::Tensor a2, sx2;
  std::tie(a2, sx2) = expert_rows<float>(w2, blocks, pairs, [&](int64_t p) { return hs + p * 2 * inter; });
  at::Tensor pair_out = at::empty({pairs, hidden}, at::kFloat);
  float* outs = pair_out.data_ptr<float>();
  run_experts(w2, blocks, a2, dot ? a2.to(at::kBFloat16) : at::Tensor(), sx2, brgemm_rows,
              [&](int64_t p, int64_t col0, int64_t cols, const float* c) {
                for (int64_t col = 0; col < cols; ++col) outs[p * hidden + col0 + col] = c[col] * weight_of[p];
              });
  // combine each token's k rows
  at::Tensor out = at::empty({tokens, hidden}, x.options());
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(hidden);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float* row = outs + pos[t * k + j] * hidden;
        for (int64_t i = 0; i < hidden; ++i) sum[i] += row[i];
      }
      if constexpr (std::is_same_v<T, float>) {
        std::copy(sum.begin(), sum.end(), out.data_ptr<float>() + t * hidden);
      } else {
        uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + t * hidden;
        for (int64_t i = 0; i < hidden; ++i) dst[i] = float_to_bits(sum[i]);
      }
    }
  });
  return out;
}

at::Tensor quant_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                     const at::Tensor& q13, const at::Tensor& s13, const c10::optional<at::Tensor>& z13,
                     const c10::optional<at::Tensor>& p13, int64_t bits13, int64_t gs13, int64_t n13,
                     const at::Tensor& q2, const at::Tensor& s2, const c10::optional<at::Tensor>& z2,
                     const c10::optional<at::Tensor>& p2, int64_t bits2, int64_t gs2, int64_t n2,
                     int64_t brgemm_rows) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quant_moe: x must be a contiguous [tokens, hidden] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_moe: x must be float32 or bfloat16");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_ids.is_contiguous() && topk_ids.dim() == 2 &&
                  topk_ids.size(0) == x.size(0), "quant_moe: topk_ids must be contiguous int64 [tokens, k]");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous() &&
                  topk_weights.sizes() == topk_ids.sizes(), "quant_moe: topk_weights must be float32 like topk_ids");
  TORCH_CHECK(n13 % 2 == 0 && n2 == x.size(1), "quant_moe: w13 must be [E, 2I, H] and w2 [E, H, I] with H = ",
              x.size(1), " (got n13 = ", n13, ", n2 = ", n2, ")");
  const Weight w13 = weight("w13", q13, s13, z13, p13, bits13, gs13, n13, x.size(1));
  const Weight w2 = weight("w2", q2, s2, z2, p2, bits2, gs2, n2, n13 / 2);
  TORCH_CHECK(q2.size(0) == q13.size(0), "quant_moe: w13 and w2 must hold the same experts");
  if (x.scalar_type() == at::kFloat) return quant_moe_impl<float>(x, topk_ids, topk_weights, w13, w2, brgemm_rows);
  return quant_moe_impl<at::BFloat16>(x, topk_ids, topk_weights, w13, w2, brgemm_rows);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def("quant_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor q13, Tensor s13, Tensor? z13, "
        "Tensor? p13, int bits13, int gs13, int n13, Tensor q2, Tensor s2, Tensor? z2, Tensor? p2, int bits2, "
        "int gs2, int n2, int brgemm_rows=9223372036854775807) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("quant_moe", &quant_moe); }

}  // namespace meshserve
