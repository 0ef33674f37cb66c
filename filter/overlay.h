// Overlay: buffered content laid over what the plugin returns.
//
// A read takes an Overlay (a snapshot of the buffered ranges it touches)
// *before* it reads the plugin, then applies it.  Whatever the flusher does in
// between, the snapshot holds content at least as new as the plugin's, so
// the result is never stale.  Pieces are applied in order: older (the batch
// being flushed) first, newer (active) last.
//
// Thread safety: an Overlay is owned by one thread; it holds chunk references,
// never the engine lock.
#pragma once

#include <cstdint>
#include <vector>

#include "dirty_map.h"

namespace sdccache {

// One block-status extent; `type` uses nbdkit's bits (1 = hole, 2 = zero).
struct Extent {
  uint64_t offset;
  uint64_t length;
  uint32_t type;
  bool operator==(const Extent&) const = default;
};
inline constexpr uint32_t kExtentHole = 1;
inline constexpr uint32_t kExtentZero = 2;

class Overlay {
 public:
  Overlay(uint64_t offset, uint64_t length) : offset_(offset), length_(length) {}

  // Appends pieces; each call's pieces are newer than every earlier call's.
  std::vector<DirtyRange>& pieces() { return pieces_; }
  bool empty() const { return pieces_.empty(); }
  // True when buffered ranges cover every byte, so the plugin need not be read.
  bool CoversAll() const;
  // Writes the buffered content into buf, which holds [offset, offset+length).
  void ApplyTo(uint8_t* buf) const;
  // Lays the overlay over the plugin's extents, which must cover
  // [offset, offset+n) contiguously from offset for some n > 0; returns
  // contiguous extents from offset, merged where types are equal.
  std::vector<Extent> MergeExtents(const std::vector<Extent>& plugin) const;

 private:
  uint64_t offset_, length_;
  std::vector<DirtyRange> pieces_;
};

}  // namespace sdccache
