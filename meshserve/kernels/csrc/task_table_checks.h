// Bounds checks of a Task-Table before the executor trusts it: every row, column, head, partial row, tree
// bit and block id a task would touch must lie inside its tensor, and every block-table entry a task reads
// must be a real block. Block tables are padded with -1 (engine/runner.py pad_tables), so a task that reads
// past its sequence's blocks fails here instead of attending another request's block 0.
//
// One serial pass, always on: O(tasks + block-table entries read), against the executor's
// O(rows x positions x head dim) (benchmarks/attention_checks.py measures it).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention_task.h"

namespace meshserve {
namespace attention {

inline void check_task_table(const Shapes& s, int64_t num_tokens, int64_t num_seqs, const int32_t* tables,
                             const int32_t* tasks, int64_t num_tasks, const int64_t* starts, int64_t num_starts,
                             const int32_t* combine, int64_t num_combine, int64_t tree_bits,
                             int64_t partial_rows) {
  TORCH_CHECK(partial_rows >= 0, "meta_attention: partial_rows must be >= 0, got ", partial_rows);
  TORCH_CHECK(num_starts >= 1 && starts[0] == 0 && starts[num_starts - 1] == num_tasks,
              "meta_attention: thread_starts must run from 0 to the ", num_tasks, " tasks");
  for (int64_t w = 0; w + 1 < num_starts; ++w)
    TORCH_CHECK(starts[w] <= starts[w + 1], "meta_attention: thread_starts decrease at thread row ", w);
  // Per sequence, the highest KV position any task reads: its block-table prefix is checked once.
  std::vector<int64_t> kv_end(num_seqs, 0);
  for (int64_t i = 0; i < num_tasks; ++i) {
    const int32_t* t = tasks + i * NCOLS;
    TORCH_CHECK(t[SEQ] >= 0 && t[SEQ] < num_seqs, "meta_attention: task ", i, " seq ", t[SEQ],
                " outside the ", num_seqs, " block tables");
    TORCH_CHECK(t[Q_START] >= 0 && t[Q_ROWS] >= 1 && t[Q_START] + t[Q_ROWS] <= num_tokens, "meta_attention: task ",
                i, " query rows [", t[Q_START], ", ", t[Q_START] + t[Q_ROWS], ") outside the ", num_tokens,
                " tokens");
    TORCH_CHECK(t[KV_HEAD] >= 0 && t[KV_HEAD] < s.kv_heads, "meta_attention: task ", i, " kv head ", t[KV_HEAD],
                " outside [0, ", s.kv_heads, ")");
    TORCH_CHECK(t[KV_LO] >= 0 && t[KV_LO] <= t[KV_HI] && t[KV_HI] <= s.max_blocks * s.block_size,
                "meta_attention: task ", i, " KV range [", t[KV_LO], ", ", t[KV_HI], ") outside the table's ",
                s.max_blocks * s.block_size, " positions");
    TORCH_CHECK(t[MASK] >= NONE && t[MASK] <= TREE, "meta_attention: task ", i, " unknown mask ", t[MASK]);
    if (t[MASK] == TREE)
      TORCH_CHECK(t[TREE_OFF] >= 0 && t[TREE_LEN] >= t[Q_ROWS] && t[KV_HI] <= t[Q_POS0] + t[Q_ROWS] &&
                      t[TREE_OFF] + static_cast<int64_t>(t[TREE_LEN]) * t[TREE_LEN] <= tree_bits,
                  "meta_attention: task ", i, " tree mask outside the ", tree_bits, " bits");
    TORCH_CHECK(t[PARTIAL] == -1 || (t[PARTIAL] >= 0 && t[PARTIAL] + t[Q_ROWS] * s.group <= partial_rows),
                "meta_attention: task ", i, " partial rows from ", t[PARTIAL], " outside the ", partial_rows);
    if (t[KV_HI] > t[KV_LO]) kv_end[t[SEQ]] = std::max<int64_t>(kv_end[t[SEQ]], t[KV_HI]);
  }
  for (int64_t q = 0; q < num_seqs; ++q) {
    const int32_t* row = tables + q * s.max_blocks;
    for (int64_t b = 0; b < (kv_end[q] + s.block_size - 1) / s.block_size; ++b)
      TORCH_CHECK(row[b] >= 0 && row[b] < s.blocks, "meta_attention: sequence ", q, " reads block table column ",
                  b, " = ", row[b], ", not a block in [0, ", s.blocks, ") (past its blocks?)");
  }
  for (int64_t i = 0; i < num_combine; ++i) {
    const int32_t* c = combine + i * 5;
    TORCH_CHECK(c[0] >= 0 && c[1] >= 1 && c[0] + c[1] <= num_tokens && c[2] >= 0 && c[2] < s.kv_heads &&
                    c[3] >= 0 && c[4] >= 1 && c[3] + static_cast<int64_t>(c[4]) * c[1] * s.group <= partial_rows,
                "meta_attention: combine row ", i, " outside the tokens, kv heads or ", partial_rows,
                " partial rows");
  }
}

}  // namespace attention
}  // namespace meshserve
