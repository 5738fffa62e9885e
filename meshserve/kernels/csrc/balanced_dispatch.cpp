// Balanced expert-parallel dispatch's quotas for one MoE layer: where each replica's share of the step's
// pairs ends, from the replica table holds [experts, ranks] and the step's pairs per expert counts [experts].
//
// Python oracle: replica_bounds_reference (engine/distributed/balanced.py), i.e. placement/dispatch.py's
// levelling (_level, one layer, one batch row) rounded to integer quotas. That is about 20 numpy calls per
// sweep, ~0.8 ms per layer; this loop is the same arithmetic in a few microseconds. Numerics follow the
// oracle operation for operation, so the quotas are equal, not close: float32 loads and shares, float64
// sums where numpy sums in float64 (np.bincount), a group of more than two replicas levelled in float64
// (numpy promotes its division by arange), sums in numpy's order. Built with -std=c++17, so GCC does not
// contract a * b + c into an FMA (that would change the last bit).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace meshserve {
namespace {

// np.clip(x, 0, hi) of a float32: max first, then min.
inline float clip(float x, float hi) { return std::min(std::max(x, 0.0f), hi); }

at::Tensor replica_bounds(const at::Tensor& holds_in, const at::Tensor& counts_in, int64_t sweeps) {
  TORCH_CHECK(holds_in.dim() == 2, "replica_bounds: holds must be [experts, ranks]");
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == holds_in.size(0),
              "replica_bounds: counts must be [experts], one per row of holds");
  TORCH_CHECK(sweeps >= 1, "replica_bounds: sweeps must be >= 1, got ", sweeps);
  const at::Tensor holds = holds_in.to(at::kBool).contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const int64_t experts = holds.size(0), ranks = holds.size(1);
  const bool* h = holds.data_ptr<bool>();
  const int64_t* n = counts.data_ptr<int64_t>();

  // replicas and holders (ascending rank) per expert; replicated experts per rank ("crowd")
  std::vector<int64_t> reps(experts, 0), holder(experts * ranks), crowd(ranks, 0);
  int64_t most = 1;
  for (int64_t e = 0; e < experts; ++e) {
    for (int64_t d = 0; d < ranks; ++d)
      if (h[e * ranks + d]) holder[e * ranks + reps[e]++] = d;
    most = std::max(most, reps[e]);
    if (reps[e] > 1)
      for (int64_t k = 0; k < reps[e]; ++k) ++crowd[holder[e * ranks + k]];
  }
  std::vector<float> c(experts), share(experts * ranks, 0.0f), step(experts, 0.0f);
  for (int64_t e = 0; e < experts; ++e) c[e] = static_cast<float>(n[e]);

  // the even split's loads: float32 products summed in float64, expert by expert (Placement.device_load)
  std::vector<float> load(ranks);
  for (int64_t d = 0; d < ranks; ++d) {
    double acc = 0.0;
    for (int64_t e = 0; e < experts; ++e)
      if (h[e * ranks + d]) acc += static_cast<double>(c[e] * static_cast<float>(1.0 / std::max<int64_t>(reps[e], 1)));
    load[d] = static_cast<float>(acc);
  }

  // the replicated experts in the oracle's group order: by replica count, then expert
  std::vector<int64_t> order;
  for (int64_t e = 0; e < experts; ++e)
    if (reps[e] > 1) order.push_back(e);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return reps[a] < reps[b]; });
  for (int64_t e : order) {
    int64_t busiest = 0;
    for (int64_t k = 0; k < reps[e]; ++k) busiest = std::max(busiest, crowd[holder[e * ranks + k]]);
    step[e] = static_cast<float>(1.0 / static_cast<double>(busiest));
    for (int64_t k = 0; k < reps[e]; ++k) share[e * ranks + k] = c[e] / static_cast<float>(reps[e]);
  }

  std::vector<double> move(experts * ranks), added(ranks), level(ranks);
  std::vector<float> others(ranks), low(ranks);
  for (int64_t sweep = 0; sweep < sweeps; ++sweep) {
    for (int64_t e : order) {  // Jacobi: every expert against the loads as they stood before the sweep
      const int64_t r = reps[e], *at = &holder[e * ranks];
      float* s = &share[e * ranks];
      double* mv = &move[e * ranks];
      if (r == 2) {  // _level_pair: the closed form, in float32
        const float o0 = load[at[0]] - s[0], o1 = load[at[1]] - s[1];
        float first = c[e] + o1;
        first -= o0;
        first /= 2.0f;
        first = clip(first, c[e]);
        const float m0 = (first - s[0]) * step[e], m1 = ((c[e] - first) - s[1]) * step[e];
        s[0] += m0;
        s[1] += m1;
        mv[0] = m0, mv[1] = m1;
        continue;
      }
      // _levelled: water-fill count over the holders' loads without this expert, in float64
      for (int64_t k = 0; k < r; ++k) others[k] = load[at[k]] - s[k];
      std::copy(others.begin(), others.begin() + r, low.begin());
      std::sort(low.begin(), low.begin() + r);
      float cum = 0.0f;
      int64_t under = 0;
      for (int64_t k = 0; k < r; ++k) {
        cum += low[k];
        level[k] = static_cast<double>(c[e] + cum) / static_cast<double>(k + 1);
        under += level[k] > static_cast<double>(low[k]);
      }
      const double fill = level[std::max<int64_t>(under - 1, 0)];
      for (int64_t k = 0; k < r; ++k) {
        const double levelled = std::max(fill - static_cast<double>(others[k]), 0.0);
        mv[k] = static_cast<double>(step[e]) * (levelled - static_cast<double>(s[k]));
        s[k] = static_cast<float>(static_cast<double>(s[k]) + mv[k]);
      }
    }
    std::fill(added.begin(), added.end(), 0.0);  // np.bincount: each rank's moves summed in group order
    for (int64_t e : order)
      for (int64_t k = 0; k < reps[e]; ++k) added[holder[e * ranks + k]] += move[e * ranks + k];
    for (int64_t d = 0; d < ranks; ++d) load[d] = static_cast<float>(static_cast<double>(load[d]) + added[d]);
  }

  // quotas: the shares' running sum rounded half to even (np.rint), monotone, capped at the count; the last
  // replica takes the rounding's rest
  at::Tensor bounds = at::empty({experts, most}, counts.options());
  int64_t* b = bounds.data_ptr<int64_t>();
  for (int64_t e = 0; e < experts; ++e) {
    double cum = 0.0;
    int64_t high = INT64_MIN;
    for (int64_t j = 0; j < most; ++j) {
      const float part = reps[e] > 1 ? (j < reps[e] ? share[e * ranks + j] : 0.0f) : (j == 0 ? c[e] : 0.0f);
      cum += static_cast<double>(part);
      high = std::max(high, static_cast<int64_t>(std::nearbyint(cum)));
      b[e * most + j] = j >= reps[e] - 1 ? n[e] : std::min(high, n[e]);
    }
  }
  return bounds;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(meshserve, m) { m.def("replica_bounds(Tensor holds, Tensor counts, int sweeps) -> Tensor"); }

TORCH_LIBRARY_IMPL(meshserve, CPU, m) { m.impl("replica_bounds", &replica_bounds); }

}  // namespace meshserve
