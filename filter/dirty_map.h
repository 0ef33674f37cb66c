// DirtyMap: non-overlapping buffered ranges of one export, newest wins.
//
// Each range says what the client last asked for at those bytes: data (a
// slice of a Chunk), zeroes, or a trim.  Insert() cuts away whatever older
// ranges it overlaps, so the map always holds exactly the newest content for
// every buffered byte.  Unaligned and partially overlapping requests are
// handled at byte granularity.
//
// Thread safety: none; the owner (WriteBack) serialises access.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

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

class DirtyMap {
 public:
  // Heap bytes the index spends per range, for memory accounting.
  static constexpr size_t kNodeBytes =
      sizeof(std::pair<const uint64_t, DirtyRange>) + 4 * sizeof(void*);

  void Insert(DirtyRange r);
  // Merge-back: keeps every range of this map, and adds the parts of
  // `older` this map does not cover.
  void InsertUnder(DirtyMap&& older);
  // Appends the parts of buffered ranges inside [offset, offset+length),
  // in offset order.
  void Collect(uint64_t offset, uint64_t length, std::vector<DirtyRange>* out) const;

  // Drops the range that starts at `offset` (written by a batch that then
  // failed elsewhere).
  void Erase(uint64_t offset);

  bool empty() const { return ranges_.empty(); }
  size_t size() const { return ranges_.size(); }
  uint64_t data_bytes() const { return data_bytes_; }  // live kData bytes
  uint64_t total_bytes() const { return total_bytes_; }  // all kinds
  void clear();

  std::map<uint64_t, DirtyRange>::const_iterator begin() const { return ranges_.begin(); }
  std::map<uint64_t, DirtyRange>::const_iterator end() const { return ranges_.end(); }

  // "[off,+len)D [off,+len)Z ..." for tests and debug output.
  std::string ToString() const;

 private:
  void Add(DirtyRange r);
  std::map<uint64_t, DirtyRange>::iterator Remove(std::map<uint64_t, DirtyRange>::iterator it);

  std::map<uint64_t, DirtyRange> ranges_;  // keyed by offset
  uint64_t data_bytes_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace sdccache
