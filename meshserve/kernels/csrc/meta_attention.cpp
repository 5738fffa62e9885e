// Meta-Attention executor: runs a Task-Table of attention tiles over a paged KV cache.
//
// Torch oracle: meshserve/kernels/meta_attention.py (paged_attention); planner: attention_tiles.py.
// Each task is one tile (q_rows query rows of one sequence) x one KV head x one KV range. Its G query heads
// (GQA) share every K/V row it reads, straight from the cache through the block table (no gather copy).
// Online softmax over KV chunks of kChunk positions, fp32 accumulation for float and bfloat16. Tasks whose
// KV range is one part of a split (long contexts, few tiles, many threads) leave unnormalised partials that
// a combine step merges. Thread row t of the Task-Table runs on worker t, in the planner's order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_task.h"
#include "decode_tile.h"
#include "fast_exp.h"
#include "prefill_tile.h"
#include "task_table_checks.h"

namespace meshserve {
namespace {

using namespace attention;

constexpr int64_t kDirectRows = 4;  // tasks with at most this many rows score by dot products

// Columns [lo, hi) of a chunk starting at KV position c0 that query position qpos may attend.
inline void row_range(const int32_t* t, int64_t qpos, int64_t c0, int64_t n, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = n;
  if (t[MASK] == NONE) return;
  hi = std::min<int64_t>(n, qpos + 1 - c0);
  if (t[MASK] == SLIDING) lo = std::max<int64_t>(0, qpos - t[WINDOW] + 1 - c0);
}

// Scores of rows [r, r + R) against a K^T chunk [D, kChunk]: each q[r][d] is broadcast against a row of
// K^T, so the inner loop runs over the chunk's positions (vector lanes) and R rows share every K^T load.
template <int R>
inline void scores_transposed(const float* qf, const float* kt, int64_t D, float* p) {
  float sc[R][kChunk] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float* kr = kt + d * kChunk;
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const float qd = qf[i * D + d];
#pragma omp simd
      for (int64_t j = 0; j < kChunk; ++j) sc[i][j] += qd * kr[j];
    }
  }
  for (int i = 0; i < R; ++i) std::copy(sc[i], sc[i] + kChunk, p + i * kChunk);
}

// acc[0:D] = alpha * acc + sum_j p[j] V[j]. With DIM fixed the row lives in registers across the chunk
// (a local array the compiler can keep there) instead of a load and a store per position.
template <int DIM>
inline void accumulate_pv(float* acc, const float* p, const float* vf, int64_t n, int64_t D, float alpha) {
  if constexpr (DIM > 0) {
    float a[DIM];
#pragma omp simd
    for (int d = 0; d < DIM; ++d) a[d] = acc[d] * alpha;
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j];
      const float* vj = vf + j * DIM;
#pragma omp simd
      for (int d = 0; d < DIM; ++d) a[d] += pj * vj[d];
    }
    std::copy(a, a + DIM, acc);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j];
      const float* vj = vf + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
    }
  }
}

// DIM > 0 fixes the head dim at compile time (full unrolling); 0 reads it at run time.
template <typename T, int DIM>
void run_task(const int32_t* t, const T* q, const T* cache, const int32_t* tables, const uint8_t* tree,
              const Shapes& s, float scale, T* out, float* part_acc, float* part_ml, std::vector<float>& buf) {
  const int64_t D = DIM > 0 ? DIM : s.dim, G = s.group, rows = t[Q_ROWS] * G, h = t[KV_HEAD];
  const int64_t lo = t[KV_LO], hi = t[KV_HI];
  // Few rows (decodes): K rows stay as they are and each score is one dot product; transposing K would
  // cost more than the rows save.
  const bool direct = rows <= kDirectRows;
  if constexpr (DIM > 0 && DIM % 32 == 0) {  // the common head dims: decode_tile.h, prefill_tile.h
    if (t[MASK] != TREE && direct)
      return run_decode_rows<T, DIM>(rows, t, q, cache, tables, s, scale, out, part_acc, part_ml);
    if (t[MASK] != TREE) return run_tile<T, DIM>(t, q, cache, tables, s, scale, out, part_acc, part_ml, buf);
  }
  buf.resize(rows * D * 2 + rows * (2 + kChunk) + 2 * kChunk * D);
  float* qf = buf.data();            // [rows, D] scaled queries; row r = query qi * G + head g
  float* acc = qf + rows * D;        // [rows, D] unnormalised output
  float* m = acc + rows * D;         // [rows] running max
  float* l = m + rows;               // [rows] running sum
  float* p = l + rows;               // [rows, kChunk] scores, then probabilities
  float* kt = p + rows * kChunk;     // [D, kChunk] K chunk, transposed ([kChunk, D] when direct)
  float* vf = kt + D * kChunk;       // [kChunk, D] V chunk
  for (int64_t qi = 0; qi < t[Q_ROWS]; ++qi) {
    const T* src = q + ((t[Q_START] + qi) * s.heads + h * G) * D;  // the group's G heads are contiguous
    float* dst = qf + qi * G * D;
    for (int64_t i = 0; i < G * D; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  }
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.f);
  const int32_t* table = tables + t[SEQ] * s.max_blocks;
  const int64_t v_half = s.v_half;
  const int64_t tree_base = t[Q_POS0] + t[Q_ROWS] - t[TREE_LEN];  // first KV position of the tree block

  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = c0 + j;
      const int64_t slot = static_cast<int64_t>(table[pos / s.block_size]) * s.block_size + pos % s.block_size;
      const T* kp = cache + (slot * s.kv_heads + h) * D;
      const T* vp = kp + v_half;
      if (direct) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kt[j * D + d] = static_cast<float>(kp[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) kt[d * kChunk + j] = static_cast<float>(kp[d]);
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) vf[j * D + d] = static_cast<float>(vp[d]);
    }
    if (direct) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < n; ++j) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qf[r * D + d] * kt[j * D + d];
          p[r * kChunk + j] = dot;
        }
    } else {
      for (int64_t j = n; j < kChunk; ++j)
        for (int64_t d = 0; d < D; ++d) kt[d * kChunk + j] = 0.f;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) scores_transposed<4>(qf + r * D, kt, D, p + r * kChunk);
      for (; r < rows; ++r) scores_transposed<1>(qf + r * D, kt, D, p + r * kChunk);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sc = p + r * kChunk;
      soft_cap(sc, n, s.softcap);
      const int64_t qpos = t[Q_POS0] + r / G;
      int64_t jlo, jhi;
      row_range(t, qpos, c0, n, jlo, jhi);
      float* pr = sc;
      float cmax = kNegInf;
#pragma omp simd reduction(max : cmax)
      for (int64_t j = 0; j < kChunk; ++j) {
        pr[j] = (j >= jlo && j < jhi) ? sc[j] : kNegInf;
        cmax = std::max(cmax, pr[j]);
      }
      if (t[MASK] == TREE) {  // the verify block's own columns follow the tree, row by row
        for (int64_t j = std::max<int64_t>(0, tree_base - c0); j < jhi; ++j) {
          const int64_t qi = qpos - tree_base, kj = c0 + j - tree_base;
          if (qi >= 0 && !tree[t[TREE_OFF] + qi * t[TREE_LEN] + kj]) pr[j] = kNegInf;
        }
        cmax = *std::max_element(pr, pr + kChunk);
      }
      if (cmax == kNegInf) continue;  // nothing visible to this row in this chunk
      const float m_new = std::max(m[r], cmax);
      const float alpha = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first visible chunk
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < kChunk; ++j) {
        pr[j] = exp_nonpositive(pr[j] - m_new);
        sum += pr[j];
      }
      m[r] = m_new;
      l[r] = l[r] * alpha + sum;
      accumulate_pv<DIM>(acc + r * D, pr, vf, n, D, alpha);
    }
  }

  finish_task(t, s, acc, m, l, rows, D, out, part_acc, part_ml);
}

// Merge the parts of each split unit: out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i.
// combine rows: {q_start, q_rows, kv_head, first partial row, parts}.
template <typename T>
void combine_parts(const int32_t* c, const Shapes& s, const float* part_acc, const float* part_ml, T* out) {
  const int64_t D = s.dim, G = s.group, rows = c[1] * G;
  std::vector<float> acc(D);
  for (int64_t r = 0; r < rows; ++r) {
    float big = kNegInf;
    for (int64_t i = 0; i < c[4]; ++i) big = std::max(big, part_ml[(c[3] + i * rows + r) * 2]);
    std::fill(acc.begin(), acc.end(), 0.f);
    float total = 0.f;
    for (int64_t i = 0; i < c[4]; ++i) {
      const int64_t row = c[3] + i * rows + r;
      if (part_ml[row * 2] == kNegInf) continue;
      const float w = std::exp(part_ml[row * 2] - big);
      total += w * part_ml[row * 2 + 1];
      const float* a = part_acc + row * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += w * a[d];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    T* dst = out + ((c[0] + r / G) * s.heads + c[2] * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] * inv);
  }
}

template <typename T>
void execute(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables, const at::Tensor& tasks,
             const at::Tensor& thread_starts, const at::Tensor& combine, const at::Tensor& tree, double scale,
             double softcap, int64_t partial_rows, at::Tensor& out) {
  const int64_t v_half = cache.size(0) == 2 ? cache.size(1) * cache.size(2) * cache.size(3) * q.size(2) : 0;
  const Shapes s{q.size(1), cache.size(3), q.size(1) / cache.size(3), q.size(2),
                 cache.size(2), cache.size(1), tables.size(1), v_half, static_cast<float>(softcap)};
  check_task_table(s, q.size(0), tables.size(0), tables.data_ptr<int32_t>(), tasks.data_ptr<int32_t>(),
                   tasks.size(0), thread_starts.data_ptr<int64_t>(), thread_starts.size(0),
                   combine.data_ptr<int32_t>(), combine.size(0), tree.numel(), partial_rows);
  auto part_acc = at::empty({std::max<int64_t>(partial_rows, 1), s.dim}, q.options().dtype(at::kFloat));
  auto part_ml = at::empty({std::max<int64_t>(partial_rows, 1), 2}, q.options().dtype(at::kFloat));
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* task = tasks.data_ptr<int32_t>();
  const int64_t* starts = thread_starts.data_ptr<int64_t>();
  const uint8_t* bits = tree.data_ptr<uint8_t>();
  float* pa = part_acc.data_ptr<float>();
  float* pm = part_ml.data_ptr<float>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);
  auto run = s.dim == 64 ? run_task<T, 64> : s.dim == 128 ? run_task<T, 128> : run_task<T, 0>;
  at::parallel_for(0, thread_starts.size(0) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t w = begin; w < end; ++w)
      for (int64_t i = starts[w]; i < starts[w + 1]; ++i) {
        // The next task's first KV lines, into L2 while this one runs: a task otherwise starts on a cold
        // chunk (a decode's whole range is a few chunks, so that wait is a large share of it).
        if (i + 1 < starts[w + 1]) {
          const int32_t* n = task + (i + 1) * NCOLS;
          prefetch_chunk<2>(cp, tp + n[SEQ] * s.max_blocks, s, n[KV_HEAD], n[KV_LO], n[KV_HI]);
        }
        run(task + i * NCOLS, qp, cp, tp, bits, s, sc, op, pa, pm, buf);
      }
  });
  const int32_t* cb = combine.data_ptr<int32_t>();
  at::parallel_for(0, combine.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) combine_parts<T>(cb + i * 5, s, pa, pm, op);
  });
}

at::Tensor meta_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                          const at::Tensor& tasks, const at::Tensor& thread_starts, const at::Tensor& combine,
                          const at::Tensor& tree_mask, double scale, int64_t partial_rows, double softcap) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && (kv_cache.size(0) == 2 || kv_cache.size(0) == 1),
              "q [T,H,D], kv_cache [2,N,B,KV,D] (or [1,...]: keys that are also the values)");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache must share a dtype");
  TORCH_CHECK(q.size(2) == kv_cache.size(4) && q.size(1) % kv_cache.size(3) == 0, "head shapes disagree");
  TORCH_CHECK(tasks.scalar_type() == at::kInt && tasks.dim() == 2 && tasks.size(1) == NCOLS, "tasks int32 [N,12]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && combine.scalar_type() == at::kInt, "tables int32");
  TORCH_CHECK(thread_starts.scalar_type() == at::kLong && tree_mask.scalar_type() == at::kByte, "table dtypes");
  TORCH_CHECK(block_tables.dim() == 2 && thread_starts.dim() == 1 && combine.dim() == 2 && combine.size(1) == 5,
              "block_tables [S,max_blocks], thread_starts [threads+1], combine [C,5]");
  auto qc = q.contiguous();
  auto cache = kv_cache.contiguous();
  auto tables = block_tables.contiguous();
  auto out = at::zeros_like(qc);
  if (q.scalar_type() == at::kFloat) {
    execute<float>(qc, cache, tables, tasks.contiguous(), thread_starts.contiguous(), combine.contiguous(),
                   tree_mask.contiguous(), scale, softcap, partial_rows, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "meta_attention supports float32 and bfloat16");
    execute<c10::BFloat16>(qc, cache, tables, tasks.contiguous(), thread_starts.contiguous(),
                           combine.contiguous(), tree_mask.contiguous(), scale, softcap, partial_rows, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def(
      "meta_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor tasks, Tensor thread_starts, "
      "Tensor combine, Tensor tree_mask, float scale, int partial_rows, float softcap=0.) -> Tensor");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("meta_attention", &meta_attention); }

}  // namespace meshserve
