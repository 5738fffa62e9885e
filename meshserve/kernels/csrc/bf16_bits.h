// bfloat16 <-> float32 as plain integer arithmetic on the raw 16 bits, so loops over them vectorise
// (c10::BFloat16's conversions go through std::isnan and a struct, and GCC leaves such loops scalar).
// Rounding is c10's: round to nearest even, every NaN to the quiet NaN 0x7FC0.
#pragma once

#include <cstdint>
#include <cstring>

inline float bits_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
}
