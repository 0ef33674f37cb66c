// RangeIndex: sorted leaves of ranges under a flat array of first keys.
#include "range_index.h"

#include <algorithm>
#include <cassert>
#include <utility>

namespace sdccache {

void RangeIndex::clear() {
  std::vector<std::unique_ptr<Leaf>>().swap(leaves_);
  std::vector<uint64_t>().swap(firsts_);
  std::vector<std::unique_ptr<Leaf>>().swap(spare_);
  size_ = 0;
}

size_t RangeIndex::bytes() const {
  return (leaves_.size() + spare_.size()) * sizeof(Leaf) +
         (leaves_.capacity() + spare_.capacity()) * sizeof(leaves_[0]) +
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

// Both searches are branchless: a lookup among many ranges finds the leaf
// cold in cache, and a binary search that branches on each probe pays a
// mispredicted branch per step and issues its loads one after another.

size_t RangeIndex::LeafFor(uint64_t key) const {
  // The last leaf whose first key is <= key (or leaf 0): upper_bound - 1.
  assert(!firsts_.empty());
  const uint64_t* base = firsts_.data();
  size_t n = firsts_.size();
  while (n > 1) {
    const size_t half = n / 2;
    base = base[half] <= key ? base + half : base;
    n -= half;
  }
  const size_t upper = static_cast<size_t>(base - firsts_.data()) + (*base <= key ? 1 : 0);
  return upper == 0 ? 0 : upper - 1;
}

RangeIndex::Pos RangeIndex::LowerBound(uint64_t key) const {
  if (leaves_.empty()) return {0, 0};
  const size_t li = LeafFor(key);
  const Leaf& leaf = *leaves_[li];
  // Counts the keys below `key` over the whole leaf: the loads do not
  // depend on each other, so a cold leaf costs about one memory latency
  // rather than one per probe.
  uint32_t s = 0;
  for (uint32_t i = 0; i < leaf.n; ++i) s += leaf.keys[i] < key ? 1 : 0;
  if (s == leaf.n) return {li + 1, 0};
  return {li, s};
}

void RangeIndex::Reserve(size_t n) {
  // Geometric, as push_back would grow them.
  if (leaves_.capacity() < leaves_.size() + n)
    leaves_.reserve(std::max(leaves_.size() + n, 2 * leaves_.capacity()));
  if (firsts_.capacity() < firsts_.size() + n)
    firsts_.reserve(std::max(firsts_.size() + n, 2 * firsts_.capacity()));
  if (spare_.capacity() < n) spare_.reserve(n);
  while (spare_.size() < n) spare_.push_back(std::make_unique<Leaf>());
}

std::unique_ptr<RangeIndex::Leaf> RangeIndex::NewLeaf() {
  if (spare_.empty()) return std::make_unique<Leaf>();
  std::unique_ptr<Leaf> leaf = std::move(spare_.back());
  spare_.pop_back();
  return leaf;
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

void RangeIndex::PushBack(DirtyRange r) {
  const uint64_t key = r.offset;
  assert(leaves_.empty() || leaves_.back()->keys[leaves_.back()->n - 1] < key);
  if (leaves_.empty() || leaves_.back()->n == kLeafCap) {
    Reserve(1);  // all it may throw, before anything changes
    auto leaf = NewLeaf();
    leaf->keys[0] = key;
    leaf->Val(0) = std::move(r);
    leaf->n = 1;
    InsertLeaf(leaves_.size(), std::move(leaf));
  } else {
    Leaf* leaf = leaves_.back().get();
    leaf->keys[leaf->n] = key;
    leaf->Val(leaf->n) = std::move(r);
    ++leaf->n;
  }
  ++size_;
}

void RangeIndex::Replace(Pos p, DirtyRange r) {
  assert(KeyAt(p) == r.offset);
  leaves_[p.leaf]->Val(p.slot) = std::move(r);
}

void RangeIndex::InsertAt(Pos p, DirtyRange r) {
  const uint64_t key = r.offset;
  if (leaves_.empty()) {
    auto leaf = NewLeaf();
    leaf->keys[0] = key;
    leaf->Val(0) = std::move(r);
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
    auto upper = NewLeaf();
    std::copy(leaf->keys + kHalf, leaf->keys + kLeafCap, upper->keys);
    for (uint32_t i = kHalf; i < kLeafCap; ++i) upper->Val(i - kHalf) = std::move(leaf->Val(i));
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
  const uint8_t spare = leaf->slot[leaf->n];  // a free vals element
  std::copy_backward(leaf->keys + s, leaf->keys + leaf->n, leaf->keys + leaf->n + 1);
  std::copy_backward(leaf->slot + s, leaf->slot + leaf->n, leaf->slot + leaf->n + 1);
  leaf->keys[s] = key;
  leaf->slot[s] = spare;
  leaf->vals[spare] = std::move(r);
  ++leaf->n;
  if (s == 0) firsts_[li] = key;
  ++size_;
}

RangeIndex::Pos RangeIndex::Erase(Pos p) {
  Leaf* leaf = leaves_[p.leaf].get();
  const uint8_t gone = leaf->slot[p.slot];
  leaf->vals[gone] = DirtyRange();  // drops its chunk reference
  std::copy(leaf->keys + p.slot + 1, leaf->keys + leaf->n, leaf->keys + p.slot);
  std::copy(leaf->slot + p.slot + 1, leaf->slot + leaf->n, leaf->slot + p.slot);
  --leaf->n;
  leaf->slot[leaf->n] = gone;
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
    for (uint32_t i = 0; i < from->n; ++i) to->Val(to->n + i) = std::move(from->Val(i));
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
