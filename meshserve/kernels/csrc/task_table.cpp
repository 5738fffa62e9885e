// Meta-Attention planner in native code: the same Token-Table -> tiles -> Task-Table as
// kernels/attention_tiles.py `plan_tasks` (its oracle; tests compare the tables), without tree masks.
// The numpy planner costs ~80 small array ops per forward, which a tiny model's whole forward can cost
// again; here one pass over the sequences builds the table in microseconds.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

namespace meshserve {
namespace {

// Columns and mask kinds as in meta_attention.cpp / attention_tiles.py.
enum Col { SEQ, Q_START, Q_ROWS, Q_POS0, KV_HEAD, KV_LO, KV_HI, MASK, WINDOW, TREE_OFF, TREE_LEN, PARTIAL, NCOLS };
enum Mask { NONE = 0, CAUSAL = 1, SLIDING = 2 };

struct Tile {
  int64_t seq, q_start, rows, q_pos0, kv_lo, kv_hi, mask;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> plan_tasks(
    const at::Tensor& query_start_loc, const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
    int64_t prefill_rows, int64_t short_rows, int64_t min_split_kv, int64_t num_threads, int64_t window) {
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 metadata");
  TORCH_CHECK(query_start_loc.numel() == seq_lens.numel() + 1, "query_start_loc has one entry per sequence + 1");
  TORCH_CHECK(num_threads >= 1 && num_kv_heads >= 1 && prefill_rows >= 1 && min_split_kv >= 1, "bad sizes");
  const auto qsl_t = query_start_loc.contiguous();
  const auto lens_t = seq_lens.contiguous();
  const int32_t* qsl = qsl_t.data_ptr<int32_t>();
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int64_t seqs = seq_lens.numel(), group = num_heads / num_kv_heads;

  // Stages cut into tiles: a prefill chunk into tiles of prefill_rows rows, anything else is one tile.
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t q = qsl[s + 1] - qsl[s], kv_len = lens[s];
    if (q <= 0) continue;
    const int64_t tile = q > short_rows ? prefill_rows : q;
    for (int64_t first = 0; first < q; first += tile) {
      Tile t{s, qsl[s] + first, std::min(tile, q - first), kv_len - q + first, 0, 0, 0};
      t.kv_hi = t.q_pos0 + t.rows;  // causal: the tile's last row sees up to its own position
      t.mask = t.rows > 1 ? CAUSAL : NONE;
      if (window > 0) {
        t.kv_lo = std::max<int64_t>(0, t.q_pos0 - window + 1);
        if (std::max<int64_t>(0, t.q_pos0 + t.rows - window) > t.kv_lo) t.mask = SLIDING;
      }
      tiles.push_back(t);
    }
  }

  // Units (tile x KV head), each split into parts when much bigger than a thread's fair share.
  const int64_t units = static_cast<int64_t>(tiles.size()) * num_kv_heads;
  std::vector<int64_t> parts(units, 1);
  if (num_threads > 1 && units > 0) {
    int64_t total = 0;
    for (const Tile& t : tiles) total += t.rows * (t.kv_hi - t.kv_lo) * num_kv_heads;
    const int64_t share = std::max<int64_t>(1, total / num_threads);
    for (int64_t u = 0; u < units; ++u) {
      const Tile& t = tiles[u / num_kv_heads];
      const int64_t span = t.kv_hi - t.kv_lo, cost = t.rows * span;
      parts[u] = std::clamp<int64_t>(std::min((cost + share - 1) / share, span / min_split_kv), 1, num_threads);
    }
  }
  const int64_t n = std::accumulate(parts.begin(), parts.end(), int64_t{0});
  std::vector<int32_t> table(n * NCOLS);
  std::vector<int64_t> cost(n);
  std::vector<int32_t> combine;
  int64_t partial_rows = 0, i = 0;
  for (int64_t u = 0; u < units; ++u) {
    const Tile& t = tiles[u / num_kv_heads];
    const int64_t span = t.kv_hi - t.kv_lo, p_n = parts[u];
    for (int64_t p = 0; p < p_n; ++p, ++i) {
      const int64_t lo = t.kv_lo + span * p / p_n, hi = t.kv_lo + span * (p + 1) / p_n;
      int64_t partial = -1;
      if (p_n > 1) {
        partial = partial_rows;
        if (p == 0) combine.insert(combine.end(), {int32_t(t.q_start), int32_t(t.rows), int32_t(u % num_kv_heads),
                                                   int32_t(partial), int32_t(p_n)});
        partial_rows += t.rows * group;
      }
      // An early part of a causal split sees its whole range when the tile's first row does.
      const int64_t mask = t.mask == CAUSAL && hi <= t.q_pos0 + 1 ? NONE : t.mask;
      const int64_t row[NCOLS] = {t.seq, t.q_start, t.rows, t.q_pos0, u % num_kv_heads, lo, hi, mask,
                                  window > 0 ? window : 0, 0, 0, partial};
      std::copy(row, row + NCOLS, table.begin() + i * NCOLS);
      cost[i] = t.rows * (hi - lo);
    }
  }

  // Task-Table: largest cost first, dealt snake-wise across threads; thread rows in deal order.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int64_t>> by_thread(num_threads);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t lap = r / num_threads, pos = r % num_threads;
    by_thread[lap % 2 == 0 ? pos : num_threads - 1 - pos].push_back(order[r]);
  }
  auto tasks = at::empty({n, NCOLS}, at::kInt);
  auto starts = at::empty({num_threads + 1}, at::kLong);
  int32_t* out = tasks.data_ptr<int32_t>();
  int64_t* st = starts.data_ptr<int64_t>();
  int64_t k = 0;
  st[0] = 0;
  for (int64_t th = 0; th < num_threads; ++th) {
    for (int64_t task : by_thread[th]) std::copy_n(table.begin() + task * NCOLS, NCOLS, out + (k++) * NCOLS);
    st[th + 1] = k;
  }
  const int64_t c = static_cast<int64_t>(combine.size()) / 5;
  auto comb = at::empty({c, 5}, at::kInt);
  std::copy(combine.begin(), combine.end(), comb.data_ptr<int32_t>());
  return {tasks, starts, comb, partial_rows};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) {
  m.def(
      "plan_tasks(Tensor query_start_loc, Tensor seq_lens, int num_heads, int num_kv_heads, int prefill_rows, "
      "int short_rows, int min_split_kv, int num_threads, int window) -> (Tensor, Tensor, Tensor, int)");
}

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("plan_tasks", &plan_tasks); }

}  // namespace meshserve
