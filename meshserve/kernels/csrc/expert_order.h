// The task list both MoE ops (moe.cpp, quant_moe.cpp) share: token-expert pairs counting-sorted by expert
// (stable: token order within an expert, so each expert's rows are contiguous and read in order), then each
// expert's pairs cut into near-equal blocks of at most max_rows, largest first (the big tasks start early).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace meshserve::expert_order {

struct Block {
  int64_t expert, first, rows;  // pairs [first, first + rows) of the expert-sorted order
};

struct SortedPairs {
  std::vector<int64_t> start;     // expert e's pairs are [start[e], start[e + 1]) of the sorted order
  std::vector<int64_t> pos;       // pair p (token p / k, its choice p % k) sits at pos[p]
  std::vector<int64_t> token_of;  // the token of the sorted pair s
  std::vector<float> weight_of;   // its routing weight
};

inline SortedPairs sort_by_expert(const int64_t* ids, const float* route_w, int64_t tokens, int64_t k,
                                  int64_t experts, const char* op) {
  const int64_t pairs = tokens * k;
  SortedPairs out{std::vector<int64_t>(experts + 1, 0), std::vector<int64_t>(pairs), std::vector<int64_t>(pairs),
                  std::vector<float>(pairs)};
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < experts, op, ": expert id ", ids[p], " outside [0, ", experts, ")");
    ++out.start[ids[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) out.start[e + 1] += out.start[e];
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t s = fill[ids[p]]++;
    out.pos[p] = s;
    out.token_of[s] = p / k;
    out.weight_of[s] = route_w[p];
  }
  return out;
}

// Blocks of <= max_rows pairs, each a whole number of `unit` rows but an expert's last.
inline std::vector<Block> row_blocks(const std::vector<int64_t>& start, int64_t max_rows, int64_t unit) {
  std::vector<Block> blocks;
  for (size_t e = 0; e + 1 < start.size(); ++e) {
    const int64_t n = start[e + 1] - start[e], parts = (n + max_rows - 1) / max_rows;
    const int64_t size = parts ? ((n + parts - 1) / parts + unit - 1) / unit * unit : 0;
    for (int64_t f = start[e]; f < start[e + 1]; f += size)
      blocks.push_back({static_cast<int64_t>(e), f, std::min(size, start[e + 1] - f)});
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.rows > b.rows; });
  return blocks;
}

}  // namespace meshserve::expert_order
