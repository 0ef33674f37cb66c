// RangeIndex: sorted leaves of ranges under a flat array of first keys.
#include "range_index.h"

#include <algorithm>
#include <cassert>
#include <utility>

namespace sdccache {

void RangeIndex::clear() {
  std::vector<std::unique_ptr<Leaf>>().swap(leaves_);
  std::vector<uint64_t>().swap(firsts_);
  size_ = 0;
}

size_t RangeIndex::bytes() const {
  return leaves_.size() * sizeof(Leaf) + leaves_.capacity() * sizeof(leaves_[0]) +
         firsts_.capacity() * sizeof(firsts_[0]);
}

RangeIndex::Pos RangeIndex::Next(Pos p) const {
  if (p.slot + 1 < leaves_[p.leaf]->n) return {p.leaf, p.slot + 1};
  return {p.leaf + 1, 0};
}

RangeIndex::Pos RangeIndex::Prev(Pos p) const {
  assert(!IsBegin(p));
  if (p.slot > 0) return {p.leaf, p.slot - 1};
  return {p.leaf - 1, leaves_[p.leaf - 1]->n - 1};
}

size_t RangeIndex::LeafFor(uint64_t key) const {
  const size_t i =
      static_cast<size_t>(std::upper_bound(firsts_.begin(), firsts_.end(), key) - firsts_.begin());
  return i == 0 ? 0 : i - 1;
}

RangeIndex::Pos RangeIndex::LowerBound(uint64_t key) const {
  if (leaves_.empty()) return {0, 0};
  const size_t li = LeafFor(key);
  const Leaf& leaf = *leaves_[li];
  const auto s = static_cast<uint32_t>(std::lower_bound(leaf.keys, leaf.keys + leaf.n, key) - leaf.keys);
  if (s == leaf.n) return {li + 1, 0};
  return {li, s};
}

void RangeIndex::InsertLeaf(size_t at, std::unique_ptr<Leaf> leaf) {
  firsts_.insert(firsts_.begin() + static_cast<std::ptrdiff_t>(at), leaf->keys[0]);
  leaves_.insert(leaves_.begin() + static_cast<std::ptrdiff_t>(at), std::move(leaf));
}

void RangeIndex::RemoveLeaf(size_t at) {
  firsts_.erase(firsts_.begin() + static_cast<std::ptrdiff_t>(at));
  leaves_.erase(leaves_.begin() + static_cast<std::ptrdiff_t>(at));
}

void RangeIndex::Insert(DirtyRange r) {
  const Pos p = LowerBound(r.offset);
  InsertAt(p, std::move(r));
}

void RangeIndex::Replace(Pos p, DirtyRange r) {
  assert(KeyAt(p) == r.offset);
  leaves_[p.leaf]->vals[p.slot] = std::move(r);
}

void RangeIndex::InsertAt(Pos p, DirtyRange r) {
  const uint64_t key = r.offset;
  if (leaves_.empty()) {
    auto leaf = std::make_unique<Leaf>();
    leaf->keys[0] = key;
    leaf->vals[0] = std::move(r);
    leaf->n = 1;
    InsertLeaf(0, std::move(leaf));
    size_ = 1;
    return;
  }
  // The end, or the first slot of a leaf past the first: append to the
  // leaf before instead, so that its first key need not change.
  if (AtEnd(p) || (p.slot == 0 && p.leaf > 0)) p = Pos{p.leaf - 1, leaves_[p.leaf - 1]->n};
  size_t li = p.leaf;
  Leaf* leaf = leaves_[li].get();
  uint32_t s = p.slot;
  assert(s == leaf->n || leaf->keys[s] > key);
  assert(s == 0 || leaf->keys[s - 1] < key);
  if (leaf->n == kLeafCap) {  // split: the upper half moves to a new leaf
    constexpr uint32_t kHalf = kLeafCap / 2;
    auto upper = std::make_unique<Leaf>();
    std::copy(leaf->keys + kHalf, leaf->keys + kLeafCap, upper->keys);
    std::move(leaf->vals + kHalf, leaf->vals + kLeafCap, upper->vals);
    upper->n = kLeafCap - kHalf;
    leaf->n = kHalf;
    Leaf* up = upper.get();
    InsertLeaf(li + 1, std::move(upper));
    if (s > kHalf) {
      ++li;
      leaf = up;
      s -= kHalf;
    }
  }
  std::copy_backward(leaf->keys + s, leaf->keys + leaf->n, leaf->keys + leaf->n + 1);
  std::move_backward(leaf->vals + s, leaf->vals + leaf->n, leaf->vals + leaf->n + 1);
  leaf->keys[s] = key;
  leaf->vals[s] = std::move(r);
  ++leaf->n;
  if (s == 0) firsts_[li] = key;
  ++size_;
}

RangeIndex::Pos RangeIndex::Erase(Pos p) {
  Leaf* leaf = leaves_[p.leaf].get();
  std::copy(leaf->keys + p.slot + 1, leaf->keys + leaf->n, leaf->keys + p.slot);
  std::move(leaf->vals + p.slot + 1, leaf->vals + leaf->n, leaf->vals + p.slot);
  --leaf->n;
  leaf->vals[leaf->n] = DirtyRange();  // drop the moved-from slot's chunk reference
  --size_;
  if (leaf->n == 0) {
    RemoveLeaf(p.leaf);
    return {p.leaf, 0};
  }
  if (p.slot == 0) firsts_[p.leaf] = leaf->keys[0];
  Pos next = Rebalance(p.leaf, p.slot);
  if (next.slot >= leaves_[next.leaf]->n) next = {next.leaf + 1, 0};
  return next;
}

RangeIndex::Pos RangeIndex::Rebalance(size_t at, uint32_t slot) {
  Leaf* leaf = leaves_[at].get();
  if (leaf->n >= kLeafCap / 4) return {at, slot};
  auto append = [](Leaf* to, Leaf* from) {
    std::copy(from->keys, from->keys + from->n, to->keys + to->n);
    std::move(from->vals, from->vals + from->n, to->vals + to->n);
    to->n += from->n;
    from->n = 0;
  };
  if (at + 1 < leaves_.size() && leaf->n + leaves_[at + 1]->n <= kLeafCap) {
    append(leaf, leaves_[at + 1].get());
    RemoveLeaf(at + 1);
    return {at, slot};
  }
  if (at > 0 && leaves_[at - 1]->n + leaf->n <= kLeafCap) {
    Leaf* prev = leaves_[at - 1].get();
    const Pos moved{at - 1, prev->n + slot};
    append(prev, leaf);
    RemoveLeaf(at);
    return moved;
  }
  return {at, slot};
}

}  // namespace sdccache
