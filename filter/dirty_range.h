// DirtyRange: one buffered range (data, zeroes or a trim) of an export.
#pragma once

#include <cstdint>

#include "chunk.h"

namespace sdccache {

enum class RangeKind : uint8_t { kData, kZero, kTrim };

struct DirtyRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  RangeKind kind = RangeKind::kData;
  bool may_trim = false;   // kZero only: the plugin may punch a hole
  ChunkRef chunk;          // kData only
  uint64_t chunk_offset = 0;  // kData only: where `offset` is in the chunk

  uint64_t end() const { return offset + length; }
  const uint8_t* bytes() const { return chunk.get()->data() + chunk_offset; }
  // The part of this range inside [from, to); requires an overlap.
  DirtyRange Slice(uint64_t from, uint64_t to) const;
};

}  // namespace sdccache
