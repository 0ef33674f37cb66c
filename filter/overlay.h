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

// The pieces of one Overlay.  Most reads touch one or two buffered ranges,
// so the first kInline live inside the list: no heap allocation per read.
class PieceList {
 public:
  static constexpr size_t kInline = 2;
  void push_back(DirtyRange r) {
    if (n_ < kInline)
      inline_[n_] = std::move(r);
    else
      more_.push_back(std::move(r));
    ++n_;
  }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  const DirtyRange& operator[](size_t i) const { return i < kInline ? inline_[i] : more_[i - kInline]; }

  class const_iterator {
   public:
    const_iterator(const PieceList* l, size_t i) : l_(l), i_(i) {}
    const DirtyRange& operator*() const { return (*l_)[i_]; }
    const DirtyRange* operator->() const { return &(*l_)[i_]; }
    const_iterator& operator++() {
      ++i_;
      return *this;
    }
    bool operator==(const const_iterator& o) const { return i_ == o.i_; }

   private:
    const PieceList* l_;
    size_t i_;
  };
  const_iterator begin() const { return {this, 0}; }
  const_iterator end() const { return {this, n_}; }

 private:
  DirtyRange inline_[kInline];
  std::vector<DirtyRange> more_;
  size_t n_ = 0;
};

// Widens every data extent (type 0) of `in` (contiguous, from its first
// offset) to whole 512-byte sectors counted from byte 0, within the range
// `in` covers, shortening or dropping the hole and zero extents it grows
// over.  With `cut_short` (the reply ends before the request did), a last
// hole or zero extent that ends inside a sector ends at that sector's
// start instead (the client asks again from there), or, if it lies wholly
// inside that sector and is the only extent left, is reported as data.
// Clients that copy by sectors (qemu-img convert) round a hole or zero
// extent up to whole sectors: a buffered write starting or ending inside
// a sector next to one lost its first or last bytes in the copy.
// Reporting data where there is none is always safe (it is read).
std::vector<Extent> DataOnWholeSectors(const std::vector<Extent>& in, bool cut_short);

class Overlay {
 public:
  Overlay(uint64_t offset, uint64_t length) : offset_(offset), length_(length) {}

  // Appends pieces; each call's pieces are newer than every earlier call's.
  PieceList& pieces() { return pieces_; }
  bool empty() const { return pieces_.empty(); }
  // True when buffered ranges cover every byte, so the plugin need not be read.
  bool CoversAll() const;
  // Writes the buffered content into buf, which holds [offset, offset+length).
  void ApplyTo(uint8_t* buf) const;
  // Lays the overlay over the plugin's extents, which must cover
  // [offset, offset+n) contiguously from offset for some n > 0; returns
  // contiguous extents from offset, merged where types are equal, ending
  // where the plugin's do or at offset+length, whichever is first.
  std::vector<Extent> MergeExtents(const std::vector<Extent>& plugin) const;

 private:
  uint64_t offset_, length_;
  PieceList pieces_;
};

}  // namespace sdccache
