// DirtyMap and Overlay: newest-wins ranges, reads and block status.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "dirty_map.h"
#include "fake_sink.h"
#include "memory_account.h"
#include "overlay.h"
#include "writeback.h"

namespace sdccache {

// Failure messages show extents as [offset,+length) type.
void PrintTo(const Extent& e, std::ostream* os) {
  *os << "[" << e.offset << ",+" << e.length << ") type " << e.type;
}

namespace {

class DirtyMapTest : public ::testing::Test {
 protected:
  DirtyRange Data(uint64_t off, const std::string& bytes) {
    DirtyRange r;
    r.offset = off;
    r.length = bytes.size();
    r.kind = RangeKind::kData;
    r.chunk = ChunkRef(Chunk::Create(bytes.data(), bytes.size(), &account_));
    account_.Reserve(Chunk::AllocationSize(bytes.size()), [] {});
    return r;
  }
  static DirtyRange Other(uint64_t off, uint64_t len, RangeKind kind) {
    DirtyRange r;
    r.offset = off;
    r.length = len;
    r.kind = kind;
    return r;
  }
  // Reads [off, off+len) over a base of '.' bytes.
  std::string Read(const DirtyMap& m, uint64_t off, uint64_t len) {
    Overlay ov(off, len);
    m.Collect(off, len, &ov.pieces());
    std::string buf(len, '.');
    ov.ApplyTo(reinterpret_cast<uint8_t*>(buf.data()));
    for (char& c : buf)
      if (c == 0) c = '0';
    return buf;
  }
  MemoryAccount account_{1 << 30};
};

TEST_F(DirtyMapTest, NewestWinsOnOverlap) {
  DirtyMap m;
  m.Insert(Data(10, "aaaaaaaaaa"));  // [10,20)
  m.Insert(Data(15, "bbbbbbbbbb"));  // [15,25) cuts the tail of a
  m.Insert(Data(12, "cc"));          // splits a
  EXPECT_EQ(m.ToString(), "[10,+2)D [12,+2)D [14,+1)D [15,+10)D");
  EXPECT_EQ(Read(m, 8, 20), "..aacca" "bbbbbbbbbb" "...");
  EXPECT_EQ(m.data_bytes(), 15u);
}

TEST_F(DirtyMapTest, UnalignedWriteInsideAndAcrossRanges) {
  DirtyMap m;
  m.Insert(Data(0, "0123456789"));
  m.Insert(Data(20, "abcdefghij"));
  m.Insert(Data(7, "XXXXXXXXXXXXXXX"));  // [7,22): tail of first, gap, head of second
  EXPECT_EQ(m.ToString(), "[0,+7)D [7,+15)D [22,+8)D");
  EXPECT_EQ(Read(m, 0, 30), "0123456XXXXXXXXXXXXXXXcdefghij");
  m.Insert(Data(0, std::string(30, 'z')));  // covers everything
  EXPECT_EQ(m.ToString(), "[0,+30)D");
  EXPECT_EQ(Read(m, 0, 31), std::string(30, 'z') + ".");
}

TEST_F(DirtyMapTest, ZeroAndTrimAreOrderedWithWrites) {
  DirtyMap m;
  m.Insert(Data(0, "aaaaaaaa"));
  m.Insert(Other(2, 4, RangeKind::kZero));
  m.Insert(Data(3, "b"));
  m.Insert(Other(7, 3, RangeKind::kTrim));
  EXPECT_EQ(m.ToString(), "[0,+2)D [2,+1)Z [3,+1)D [4,+2)Z [6,+1)D [7,+3)T");
  EXPECT_EQ(Read(m, 0, 11), "aa0b00a000.");
  // A write after the trim replaces it; a zero after the write replaces that.
  m.Insert(Data(7, "cc"));
  m.Insert(Other(0, 1, RangeKind::kZero));
  EXPECT_EQ(Read(m, 0, 11), "0a0b00acc0.");
}

TEST_F(DirtyMapTest, InsertUnderKeepsNewer) {
  DirtyMap older, newer;
  older.Insert(Data(0, "oooooooooo"));
  newer.Insert(Data(4, "nn"));
  newer.Insert(Other(8, 4, RangeKind::kZero));
  newer.InsertUnder(std::move(older));
  EXPECT_EQ(Read(newer, 0, 13), "oooonnoo0000.");
}

// A plain std::map doing the same newest-wins cuts as DirtyMap, for the
// tests below to check it against.
struct Ref {
  uint64_t offset, length, chunk_offset;
  RangeKind kind;
};
using RefMap = std::map<uint64_t, Ref>;

void RefInsert(RefMap& ref, Ref r) {
  const uint64_t start = r.offset, stop = r.offset + r.length;
  auto it = ref.lower_bound(start);
  if (it != ref.begin() && std::prev(it)->second.offset + std::prev(it)->second.length > start)
    --it;
  std::vector<Ref> keep;
  while (it != ref.end() && it->second.offset < stop) {
    Ref old = it->second;
    it = ref.erase(it);
    if (old.offset < start)
      keep.push_back({old.offset, start - old.offset, old.chunk_offset, old.kind});
    if (old.offset + old.length > stop)
      keep.push_back(
          {stop, old.offset + old.length - stop, old.chunk_offset + (stop - old.offset), old.kind});
  }
  for (const Ref& k : keep) ref[k.offset] = k;
  ref[r.offset] = r;
}

bool Same(const DirtyMap& m, const RefMap& ref) {
  if (m.size() != ref.size()) return false;
  auto it = ref.begin();
  uint64_t total = 0;
  for (const DirtyRange& r : m) {
    const Ref& e = (it++)->second;
    if (r.offset != e.offset || r.length != e.length || r.kind != e.kind ||
        (r.kind == RangeKind::kData && r.chunk_offset != e.chunk_offset))
      return false;
    total += r.length;
  }
  return total == m.total_bytes();
}

// The index against a plain std::map doing the same newest-wins cuts, over
// enough ranges to split, merge and empty many leaves.
TEST(DirtyMapIndexTest, MatchesAReferenceMapUnderRandomInsertsAndErases) {
  RefMap ref;
  MemoryAccount account(1ull << 40);
  const std::string payload(4096, 'x');
  std::mt19937_64 rng(12345);
  DirtyMap m;
  size_t peak = 0;
  for (int op = 0; op < 60000; ++op) {
    // Phases: grow to thousands of ranges, then shrink by wide cuts and erases.
    const bool shrinking = (op / 15000) % 2 == 1;
    const uint64_t span = 4u << 20;
    const uint64_t off = rng() % span;
    if (shrinking && rng() % 2 == 0 && !ref.empty()) {
      auto it = ref.lower_bound(off);
      if (it == ref.end()) it = ref.begin();
      const uint64_t key = it->first;
      m.Erase(key);
      ref.erase(key);
    } else {
      const uint64_t len = shrinking ? 1 + rng() % 65536 : 1 + rng() % 4096;
      DirtyRange r;
      r.offset = off;
      r.length = len;
      r.kind = static_cast<RangeKind>(rng() % 3);
      if (r.kind == RangeKind::kData) {
        account.Reserve(Chunk::AllocationSize(4096), [] {});
        r.chunk = ChunkRef(Chunk::Create(payload.data(), 4096, &account));
        r.length = std::min<uint64_t>(len, 4096);
      }
      RefInsert(ref, {r.offset, r.length, 0, r.kind});
      m.Insert(std::move(r));
    }
    peak = std::max(peak, m.size());
    if (op % 997 == 0 || m.size() < 200) {
      ASSERT_TRUE(Same(m, ref)) << "op " << op;
    }
    // A window read returns exactly the reference's pieces.
    std::vector<DirtyRange> got;
    const uint64_t woff = rng() % span, wlen = 1 + rng() % 20000;
    m.Collect(woff, wlen, &got);
    size_t expected = 0;
    for (const auto& [k, e] : ref)
      if (e.offset < woff + wlen && e.offset + e.length > woff) ++expected;
    ASSERT_EQ(got.size(), expected) << "op " << op;
    for (const DirtyRange& g : got) ASSERT_TRUE(g.offset >= woff && g.end() <= woff + wlen);
  }
  ASSERT_TRUE(Same(m, ref));
  EXPECT_GT(peak, 1000u);  // many leaves were in play
  // No erased or cut range still holds its chunk (say, from a free slot of
  // a leaf): what is charged is exactly the chunks live ranges point into.
  std::set<const Chunk*> live;
  for (const DirtyRange& r : m)
    if (r.kind == RangeKind::kData) live.insert(r.chunk.get());
  EXPECT_EQ(account.used(), live.size() * Chunk::AllocationSize(4096));
  // Clearing the map frees every chunk and the index.
  m.clear();
  EXPECT_EQ(account.used(), 0u);
  EXPECT_EQ(m.index_bytes(), 0u);
}

TEST(OverlayTest, CoversAllNeedsEveryByte) {
  Overlay ov(10, 10);
  DirtyRange a;
  a.offset = 10;
  a.length = 4;
  a.kind = RangeKind::kZero;
  ov.pieces().push_back(a);
  EXPECT_FALSE(ov.CoversAll());
  DirtyRange b = a;
  b.offset = 14;
  b.length = 6;
  ov.pieces().push_back(b);
  EXPECT_TRUE(ov.CoversAll());
}

TEST(OverlayTest, MergeExtentsReportsBufferedDataAndZeroes) {
  // Plugin: all hole; buffered: data at [4096,+4096), zero at [12288,+100).
  Overlay ov(0, 65536);
  DirtyRange d;
  d.offset = 4096;
  d.length = 4096;
  d.kind = RangeKind::kData;
  DirtyRange z;
  z.offset = 12288;
  z.length = 100;
  z.kind = RangeKind::kZero;
  ov.pieces().push_back(d);
  ov.pieces().push_back(z);
  std::vector<Extent> plugin = {{0, 65536, kExtentHole | kExtentZero}};
  std::vector<Extent> want = {{0, 4096, 3},
                              {4096, 4096, 0},
                              {8192, 4096, 3},
                              {12288, 100, kExtentZero},
                              {12388, 65536 - 12388, 3}};
  EXPECT_EQ(ov.MergeExtents(plugin), want);
}

TEST(OverlayTest, MergeExtentsStopsWherePluginStopped) {
  Overlay ov(0, 100);
  DirtyRange d;
  d.offset = 30;
  d.length = 50;
  d.kind = RangeKind::kData;
  ov.pieces().push_back(d);
  std::vector<Extent> plugin = {{0, 40, 3}};
  std::vector<Extent> want = {{0, 30, 3}, {30, 10, 0}};
  EXPECT_EQ(ov.MergeExtents(plugin), want);
}

TEST(OverlayTest, MergeExtentsStopsAtTheRequestEnd) {
  // A plugin may describe more than was asked (the file plugin reports a
  // hole up to the next data).  Buffered ranges past the request were not
  // looked up: a request for [0,4096) over a disk that is one hole, with
  // data buffered at 65536, must not say [0,1M) is a hole.
  std::string data(4096, 'x');
  FakeSink sink(1 << 20);
  WriteBackOptions o;
  o.threshold = 1000;
  o.max_age = std::chrono::milliseconds(0);
  WriteBack wb(&sink, o);
  ASSERT_EQ(wb.Write(data.data(), 4096, 65536, false), 0);
  ASSERT_EQ(wb.queued_requests(), 1u);  // still buffered, not in the sink
  std::vector<Extent> plugin = {{0, 1 << 20, kExtentHole | kExtentZero}};
  std::vector<Extent> want = {{0, 4096, kExtentHole | kExtentZero}};
  EXPECT_EQ(wb.Lookup(0, 4096).MergeExtents(plugin), want);
  // Asked for all of it, the buffered data shows.
  want = {{0, 65536, 3}, {65536, 4096, 0}, {69632, (1 << 20) - 69632, 3}};
  EXPECT_EQ(wb.Lookup(0, 1 << 20).MergeExtents(plugin), want);
}

// Data extents widened to whole 512-byte sectors: qemu-img convert rounds
// a hole or zero extent up to whole sectors, so a buffered write starting
// inside a sector after a hole lost its first bytes in the copy (100 bytes
// at 1000: 76 copied).
TEST(OverlayTest, DataOnWholeSectors) {
  auto data_on = [](std::vector<Extent> in, bool cut_short) {
    return DataOnWholeSectors(in, cut_short);
  };
  using V = std::vector<Extent>;
  EXPECT_EQ(data_on({{0, 1000, 3}, {1000, 100, 0}, {1100, 2996, 3}}, false),
            (V{{0, 512, 3}, {512, 1024, 0}, {1536, 2560, 3}}));
  EXPECT_EQ(data_on({{0, 1000, 2}, {1000, 24, 0}, {1024, 1024, 2}}, false),
            (V{{0, 512, 2}, {512, 512, 0}, {1024, 1024, 2}}));
  const V aligned = {{0, 4096, 3}, {4096, 512, 0}, {4608, 512, 2}};
  EXPECT_EQ(data_on(aligned, false), aligned);
  EXPECT_EQ(data_on(aligned, true), aligned);
  // A hole between two data extents inside their sectors is swallowed.
  EXPECT_EQ(data_on({{0, 600, 0}, {600, 100, 3}, {700, 400, 0}, {1100, 948, 3}}, false),
            (V{{0, 1536, 0}, {1536, 512, 3}}));
  // From an offset inside a sector: data starts no earlier than it.
  EXPECT_EQ(data_on({{1000, 500, 3}, {1500, 100, 0}, {1600, 1400, 3}}, false),
            (V{{1000, 24, 3}, {1024, 1024, 0}, {2048, 952, 3}}));
  // At the export's (unaligned) end: as it is.
  EXPECT_EQ(data_on({{0, 100, 0}, {100, 900, 3}}, false), (V{{0, 512, 0}, {512, 488, 3}}));
  // Cut short: a last hole ends where its sector starts (the client asks
  // again from there), or, alone in that sector, is reported as data.
  EXPECT_EQ(data_on({{0, 100, 0}, {100, 900, 3}}, true), (V{{0, 512, 0}}));
  EXPECT_EQ(data_on({{0, 700, 3}}, true), (V{{0, 512, 3}}));
  EXPECT_EQ(data_on({{512, 488, 3}}, true), (V{{512, 488, 0}}));
  EXPECT_EQ(data_on({}, true), V{});
}

// The same over random extent lists: contiguous from the first offset, no
// byte of data reported otherwise, every boundary between data and a hole
// or zero on a sector (but at the ends), no two neighbours of one type.
TEST(OverlayTest, DataOnWholeSectorsKeepsEveryByteOfData) {
  std::mt19937_64 rng(5);
  for (int round = 0; round < 20000; ++round) {
    std::vector<Extent> in;
    uint64_t pos = rng() % 3000;
    const int n = 1 + static_cast<int>(rng() % 8);
    for (int i = 0; i < n; ++i) {
      const uint64_t len = 1 + rng() % (rng() % 2 ? 100 : 2000);
      const uint32_t types[] = {0, 2, 3};
      uint32_t type = types[rng() % 3];
      if (!in.empty() && in.back().type == type) type = type == 0 ? 3 : 0;
      in.push_back({pos, len, type});
      pos += len;
    }
    const bool cut_short = rng() % 2;
    const std::vector<Extent> out = DataOnWholeSectors(in, cut_short);
    SCOPED_TRACE("round " + std::to_string(round));
    ASSERT_FALSE(out.empty());
    ASSERT_EQ(out.front().offset, in.front().offset);
    const uint64_t end = in.back().offset + in.back().length;
    const uint64_t out_end = out.back().offset + out.back().length;
    ASSERT_LE(out_end, end);
    if (!cut_short) {
      ASSERT_EQ(out_end, end);
    }
    for (size_t i = 0; i + 1 < out.size(); ++i) {
      ASSERT_GT(out[i].length, 0u);
      ASSERT_EQ(out[i].offset + out[i].length, out[i + 1].offset) << "not contiguous";
      ASSERT_NE(out[i].type, out[i + 1].type) << "neighbours of one type";
      if ((out[i].type == 0) != (out[i + 1].type == 0)) {
        ASSERT_EQ(out[i + 1].offset % 512, 0u) << "data and a hole share a sector";
      }
    }
    if (cut_short && out.back().type != 0) {
      ASSERT_EQ(out_end % 512, 0u) << "a cut reply ends with a hole inside a sector";
    }
    auto type_at = [&](const std::vector<Extent>& v, uint64_t off) {
      for (const Extent& e : v)
        if (off >= e.offset && off < e.offset + e.length) return static_cast<int>(e.type);
      return -1;
    };
    for (const Extent& e : in) {
      if (e.type != 0) continue;
      for (uint64_t b = e.offset; b < std::min(e.offset + e.length, out_end); ++b) {
        ASSERT_EQ(type_at(out, b), 0) << "byte " << b << " of data reported otherwise";
      }
    }
  }
}

DirtyRange Make(std::mt19937_64& rng, uint64_t span, uint64_t maxlen, const std::string& payload) {
  DirtyRange r;
  r.offset = rng() % span;
  r.length = 1 + rng() % maxlen;
  r.kind = static_cast<RangeKind>(rng() % 3);
  if (r.kind == RangeKind::kData) {
    r.chunk = ChunkRef(Chunk::Create(payload.data(), payload.size(), nullptr));
    r.length = std::min<uint64_t>(r.length, payload.size());
  }
  return r;
}

// InsertUnder (in place, or built aside with PushBack's full leaves, as
// the newer map has few or many ranges) against a reference, then the
// merged map used on: inserts, erases (Rebalance), lookups, further merges.
TEST(DirtyMapModelTest, InsertUnderThenRandomOpsMatchAReference) {
  const std::string payload(4096, 'x');
  for (int seed = 1; seed <= 10; ++seed) {
    std::mt19937_64 rng(seed);
    const uint64_t span = 8u << 20;
    DirtyMap older, newer;
    RefMap ref;
    const int n_old = 100 + rng() % 5000, n_new = rng() % 600;
    for (int i = 0; i < n_old; ++i) {
      DirtyRange r = Make(rng, span, 4096, payload);
      RefInsert(ref, {r.offset, r.length, 0, r.kind});
      older.Insert(std::move(r));
    }
    std::vector<DirtyRange> nl;
    for (int i = 0; i < n_new; ++i) {
      DirtyRange r = Make(rng, span, 20000, payload);
      RefInsert(ref, {r.offset, r.length, 0, r.kind});
      newer.Insert(std::move(r));
    }
    newer.InsertUnder(std::move(older));
    ASSERT_TRUE(older.empty());
    ASSERT_TRUE(Same(newer, ref)) << "seed " << seed;
    for (int op = 0; op < 4000; ++op) {
      const int what = rng() % 10;
      if (what < 4 && !ref.empty()) {
        auto it = ref.lower_bound(rng() % span);
        if (it == ref.end()) it = ref.begin();
        const uint64_t key = it->first;
        newer.Erase(key);
        ref.erase(key);
      } else if (what == 9) {  // merge another older map under it
        DirtyMap o2;
        RefMap r2;
        for (int i = 0; i < 200; ++i) {
          DirtyRange r = Make(rng, span, 4096, payload);
          RefInsert(r2, {r.offset, r.length, 0, r.kind});
          o2.Insert(std::move(r));
        }
        for (auto& [k, v] : ref) RefInsert(r2, v);
        ref = r2;
        newer.InsertUnder(std::move(o2));
      } else {
        DirtyRange r = Make(rng, span, what < 7 ? 4096 : 65536, payload);
        RefInsert(ref, {r.offset, r.length, 0, r.kind});
        newer.Insert(std::move(r));
      }
      // lookups
      const uint64_t woff = rng() % span, wlen = 1 + rng() % 30000;
      std::vector<DirtyRange> got;
      newer.Collect(woff, wlen, &got);
      size_t expected = 0;
      for (auto it = ref.begin(); it != ref.end(); ++it) {
        if (it->second.offset < woff + wlen && it->second.offset + it->second.length > woff)
          ++expected;
      }
      ASSERT_EQ(got.size(), expected) << "seed " << seed << " op " << op;
      ASSERT_EQ(newer.Overlaps(woff, wlen), expected > 0);
      if (op % 500 == 0) {
        ASSERT_TRUE(Same(newer, ref)) << "seed " << seed << " op " << op;
      }
    }
    ASSERT_TRUE(Same(newer, ref)) << "seed " << seed;
  }
}

}  // namespace
}  // namespace sdccache
