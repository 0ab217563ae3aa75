// The wire format of a general target (fastcon/targets/wire.py, which defines the same indices; the
// operator fastcon::target_format returns them for a test to compare): rows (Na, kRowFields) and cols
// (Nb, kColFields) int64 with every absent field at its default, the numbers as doubles, and the
// bits of kNumFlags saying which optional fields were given.
#pragma once

#include <cstdint>
#include <vector>

namespace fastcon {
namespace wire {

enum Row : int64_t {
  kRowId, kRowExclude, kRowLo, kRowHi, kRowOwner, kRowRule, kRowGroup, kRowPenalty, kRowPair, kRowFields
};
enum Col : int64_t { kColId, kColOwner, kColKeep, kColPenalty, kColFields };
enum Num : int64_t {
  kNumPairOffset, kNumMargin, kNumPenalty, kNumPenaltyMode, kNumSoft, kNumHard, kNumTeacherKind, kNumC0, kNumC1,
  kNumEps, kNumEntropy, kNumDebias, kNumMarginRelative, kNumFlags, kNumberCount
};
enum Flag : int64_t {
  kHasExclude = 1, kHasKeep = 2, kHasRange = 4, kHasRowOwner = 8, kHasColOwner = 16, kHasRule = 32, kHasGroup = 64,
  kHasPenaltyCols = 128, kHasPenaltyRows = 256, kHasPairCol = 512
};
constexpr int64_t kTeacherLinear = 1;  // kNumTeacherKind of a linear teacher (0: a softmax teacher)
constexpr int64_t kTeacherGuide = 2;   // ... of a guide: its tile decides the margin rule (no soft targets)

// In the order of format_indices() in wire.py.
inline std::vector<int64_t> format_indices() {
  return {kRowId, kRowExclude, kRowLo, kRowHi, kRowOwner, kRowRule, kRowGroup, kRowPenalty, kRowPair, kRowFields,
          kColId, kColOwner, kColKeep, kColPenalty, kColFields,
          kNumPairOffset, kNumMargin, kNumPenalty, kNumPenaltyMode, kNumSoft, kNumHard, kNumTeacherKind, kNumC0,
          kNumC1, kNumEps, kNumEntropy, kNumDebias, kNumMarginRelative, kNumFlags, kNumberCount,
          kHasExclude, kHasKeep, kHasRange, kHasRowOwner, kHasColOwner, kHasRule, kHasGroup, kHasPenaltyCols,
          kHasPenaltyRows, kHasPairCol, kTeacherLinear, kTeacherGuide};
}

}  // namespace wire
}  // namespace fastcon
