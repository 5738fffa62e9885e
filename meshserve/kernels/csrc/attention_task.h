// What the Meta-Attention executor's task kinds share: the Task-Table columns, shapes, and how a finished
// task leaves its rows (normalised output, or a split part's unnormalised partials for the combine step).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace meshserve {
namespace attention {

constexpr int64_t kChunk = 32;  // KV positions per online-softmax step: a chunk's K and V stay in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Task-Table columns (attention_tiles.py TASK_COLUMNS names the same fields).
enum Col { SEQ, Q_START, Q_ROWS, Q_POS0, KV_HEAD, KV_LO, KV_HI, MASK, WINDOW, TREE_OFF, TREE_LEN, PARTIAL, NCOLS };
enum Mask { NONE = 0, CAUSAL = 1, SLIDING = 2, TREE = 3 };

// v_half: elements from a K row to its V row (cache[1]); 0 for a one-part cache whose keys are also the values
// (MLA's latent: the first dims of each key row are its value).
struct Shapes {
  int64_t heads, kv_heads, group, dim, block_size, blocks, max_blocks, v_half;
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) before the mask (Gemma 2); 0: off
};

// Gemma 2's score soft-capping over n scores in place (a no-op when softcap is 0).
inline void soft_cap(float* scores, int64_t n, float softcap) {
  if (softcap <= 0.f) return;
  const float inv = 1.f / softcap;
  for (int64_t j = 0; j < n; ++j) scores[j] = std::tanh(scores[j] * inv) * softcap;
}

// Pointers to the rows of KV positions [c0, c0 + n) of KV head h in the cache half `cache`, through the
// sequence's block table: one division per chunk, not one per position.
template <typename T>
inline void kv_rows(const T* cache, const int32_t* table, const Shapes& s, int64_t h, int64_t c0, int64_t n,
                    int64_t D, const T** rows) {
  int64_t block = c0 / s.block_size, off = c0 % s.block_size;
  for (int64_t j = 0; j < n; ++j) {
    rows[j] = cache + ((static_cast<int64_t>(table[block]) * s.block_size + off) * s.kv_heads + h) * D;
    if (++off == s.block_size) {
      off = 0;
      ++block;
    }
  }
}

// Prefetch the cache lines of one K or V row. A task reads each line once, and with the block table between
// them the hardware prefetchers lose the stream at every block edge: without this every chunk waits on the
// memory latency row after row.
// Locality 3 fills L1; 2 stops at L2, whose miss queue holds more lines in flight than L1's, so a request
// further ahead does not hold back the nearer ones.
template <int LOCALITY = 3, typename T>
inline void prefetch_row(const T* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(row + d, 0, LOCALITY);
}

// Prefetch n K rows and their V rows (v_half elements further).
template <int LOCALITY = 3, typename T>
inline void prefetch_rows(const T* const* rows, int64_t n, int64_t D, int64_t v_half) {
  for (int64_t j = 0; j < n; ++j) {
    prefetch_row<LOCALITY>(rows[j], D);
    prefetch_row<LOCALITY>(rows[j] + v_half, D);
  }
}

// Prefetch KV positions [c0, c0 + n) of KV head h (K and V rows), clipped to [c0, hi).
template <int LOCALITY = 3, typename T>
inline void prefetch_chunk(const T* cache, const int32_t* table, const Shapes& s, int64_t h, int64_t c0,
                           int64_t hi) {
  const int64_t n = std::min<int64_t>(kChunk, hi - c0);
  if (n <= 0) return;
  const T* rows[kChunk];
  kv_rows(cache, table, s, h, c0, n, s.dim, rows);
  prefetch_rows<LOCALITY>(rows, n, s.dim, s.blocks * s.block_size * s.kv_heads * s.dim);
}

// Rows r = query (r / G) x head (r % G) of task t: acc [rows, D] unnormalised, m / l the running max / sum.
template <typename T>
inline void finish_task(const int32_t* t, const Shapes& s, const float* acc, const float* m, const float* l,
                        int64_t rows, int64_t D, T* out, float* part_acc, float* part_ml) {
  const int64_t G = s.group, h = t[KV_HEAD];
  if (t[PARTIAL] >= 0) {  // one part of a split KV range: the combine step normalises
    std::copy(acc, acc + rows * D, part_acc + t[PARTIAL] * D);
    for (int64_t r = 0; r < rows; ++r) {
      part_ml[(t[PARTIAL] + r) * 2] = m[r];
      part_ml[(t[PARTIAL] + r) * 2 + 1] = l[r];
    }
    return;
  }
  for (int64_t qi = 0; qi < t[Q_ROWS]; ++qi) {
    T* dst = out + ((t[Q_START] + qi) * s.heads + h * G) * D;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = qi * G + g;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int64_t d = 0; d < D; ++d) dst[g * D + d] = static_cast<T>(acc[r * D + d] * inv);
    }
  }
}

}  // namespace attention
}  // namespace meshserve
