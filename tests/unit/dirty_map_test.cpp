// DirtyMap and Overlay: newest-wins ranges, reads and block status.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "dirty_map.h"
#include "memory_account.h"
#include "overlay.h"

namespace sdccache {
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

}  // namespace
}  // namespace sdccache
