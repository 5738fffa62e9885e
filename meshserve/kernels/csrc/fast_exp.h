// exp as plain float arithmetic the compiler vectorises (std::exp stays scalar without -ffast-math):
// Cephes' expf, 2^n * p(r), relative error < 2e-7. Shared by the native operators. The loops that call
// it vectorise only under -fno-trapping-math (kernels/native.py's CFLAGS), because of std::floor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// exp(x) for x already clamped to [-87, 88] (float32's finite range).
inline float exp_cephes(float xc) {
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp(x) for x <= 0 (a score minus its row's running max); exp(-inf) (a masked score) is exactly 0.
inline float exp_nonpositive(float x) { return x < -87.f ? 0.f : exp_cephes(std::max(x, -87.f)); }

// exp(x) clamped to float32's finite range, so silu saturates cleanly.
inline float exp_clamped(float x) { return exp_cephes(std::min(std::max(x, -87.f), 88.f)); }
