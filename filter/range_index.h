// RangeIndex: the ordered store behind DirtyMap, keyed by range offset.
//
// A std::map spends one heap node per range, scattered among the payload
// buffers: an overlay lookup among 100,000 buffered ranges walked ~17 nodes
// on as many pages (2 µs, mostly cache and TLB misses).  Here ranges live
// sorted in leaves of up to kLeafCap entries, keys apart from values, and a
// flat array holds each leaf's first key.  A lookup is a binary search in
// that array (a few KiB, cache-resident) and one in a leaf's keys.
//
// Leaves split when full and merge with a neighbour when under a quarter
// full, so every leaf but a few stays well used.
//
// Thread safety: none; DirtyMap's owner serialises access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "dirty_range.h"

namespace sdccache {

class RangeIndex {
 public:
  static constexpr uint32_t kLeafCap = 64;

  struct Pos {
    size_t leaf = 0;
    uint32_t slot = 0;
    bool operator==(const Pos&) const = default;
  };

  RangeIndex() = default;
  RangeIndex(RangeIndex&&) noexcept = default;
  RangeIndex& operator=(RangeIndex&&) noexcept = default;
  RangeIndex(const RangeIndex&) = delete;
  RangeIndex& operator=(const RangeIndex&) = delete;

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  void clear();
  // Heap bytes held (leaves and the first-key array).
  size_t bytes() const;

  Pos Begin() const { return Pos{}; }
  Pos End() const { return Pos{leaves_.size(), 0}; }
  bool AtEnd(Pos p) const { return p.leaf >= leaves_.size(); }
  const DirtyRange& At(Pos p) const { return leaves_[p.leaf]->Val(p.slot); }
  uint64_t KeyAt(Pos p) const { return leaves_[p.leaf]->keys[p.slot]; }
  Pos Next(Pos p) const;
  // The entry before p (p may be the end); requires one.
  Pos Prev(Pos p) const;
  bool IsBegin(Pos p) const { return p.leaf == 0 && p.slot == 0; }

  // First entry whose key is >= key (or the end).
  Pos LowerBound(uint64_t key) const;
  // Adds r under key r.offset, which must not be present.
  void Insert(DirtyRange r);
  // The same, where p is LowerBound(r.offset) (saves the search).
  void InsertAt(Pos p, DirtyRange r);
  // Adds r after every entry (its key is greater than theirs), filling
  // leaves up; may throw std::bad_alloc, changing nothing.
  void PushBack(DirtyRange r);
  // Replaces the entry at p with r, which has the same key.
  void Replace(Pos p, DirtyRange r);
  // Removes the entry at p; returns the position of the one after it.
  Pos Erase(Pos p);
  // Makes the next `n` Insert/InsertAt calls allocate nothing (they cannot
  // throw then); throws std::bad_alloc, changing nothing, if it cannot.
  void Reserve(size_t n);
  // Frees the leaves Reserve kept aside.
  void DropSpares() { std::vector<std::unique_ptr<Leaf>>().swap(spare_); }

  class const_iterator {
   public:
    const_iterator(const RangeIndex* idx, Pos p) : idx_(idx), p_(p) {}
    const DirtyRange& operator*() const { return idx_->At(p_); }
    const DirtyRange* operator->() const { return &idx_->At(p_); }
    const_iterator& operator++() {
      p_ = idx_->Next(p_);
      return *this;
    }
    bool operator==(const const_iterator& o) const { return p_ == o.p_; }

   private:
    const RangeIndex* idx_;
    Pos p_;
  };
  const_iterator begin() const { return {this, Begin()}; }
  const_iterator end() const { return {this, Pos{leaves_.size(), 0}}; }

 private:
  // Keys are kept sorted; values are not moved when an entry is added or
  // removed: slot[i] says which vals element holds the i-th entry in key
  // order, and slot[n..kLeafCap) list the free elements.  An insert in the
  // middle of a leaf so shifts 8-byte keys and 1-byte slots, not 40-byte
  // ranges (whose chunk references make every move a read-modify-write).
  struct Leaf {
    Leaf() {
      for (uint32_t i = 0; i < kLeafCap; ++i) slot[i] = static_cast<uint8_t>(i);
    }
    DirtyRange& Val(uint32_t i) { return vals[slot[i]]; }
    const DirtyRange& Val(uint32_t i) const { return vals[slot[i]]; }
    uint32_t n = 0;
    uint8_t slot[kLeafCap];
    uint64_t keys[kLeafCap];
    DirtyRange vals[kLeafCap];
  };
  static_assert(kLeafCap <= 256, "slot numbers are bytes");
  // The leaf that holds, or would hold, key.
  size_t LeafFor(uint64_t key) const;
  void InsertLeaf(size_t at, std::unique_ptr<Leaf> leaf);
  void RemoveLeaf(size_t at);
  // Merges leaves[at] with a neighbour if it is under a quarter full and
  // the two fit in one; returns where the entry that was at (at, slot) is.
  Pos Rebalance(size_t at, uint32_t slot);

  std::unique_ptr<Leaf> NewLeaf();  // a spare one (Reserve) if any
  std::vector<std::unique_ptr<Leaf>> spare_;
  std::vector<std::unique_ptr<Leaf>> leaves_;
  std::vector<uint64_t> firsts_;  // firsts_[i] == leaves_[i]->keys[0]
  size_t size_ = 0;
};

}  // namespace sdccache
