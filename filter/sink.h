// Sink: the plugin below the filter, as the engine sees it (the test seam).
//
// Every method returns 0 on success or a positive errno.  The glue adapts an
// nbdkit_next context; unit tests use an in-memory fake.  A Sink must allow
// calls from the flusher thread and client threads at once (the glue
// serialises them itself when the plugin's thread model requires it).
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>

namespace sdccache {

class Sink {
 public:
  virtual ~Sink() = default;
  virtual int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) = 0;
  virtual int Zero(uint32_t count, uint64_t offset, bool may_trim, bool fua) = 0;
  virtual int Trim(uint32_t count, uint64_t offset, bool fua) = 0;
  virtual int Flush() = 0;
  // How many plugin calls Zero() or Trim() of `count` bytes makes (the
  // plugin_writes counter): a plugin that cannot zero gets zero blocks
  // written in pieces, one that cannot trim gets no call.
  virtual uint64_t ZeroCalls(uint32_t /*count*/) const { return 1; }
  virtual uint64_t TrimCalls() const { return 1; }
  // How many times writes made through the Sink were dropped before a flush
  // covered them (a plugin context that carried them went away, its last
  // flush failing).  Flush() reports such a loss once, to whichever flush
  // comes first; a caller that must know about its own writes compares this
  // count from before them to after its flush.
  virtual uint64_t losses() { return 0; }
  // The plugin's error that made the latest of those losses (the failed
  // flush's), EIO if it gave none.
  virtual int loss_error() { return EIO; }
  // A client request was failed for the losses up to `n`: Flush() need not
  // report those again.
  virtual void LossesTold(uint64_t /*n*/) {}
};

// Writes [offset, offset + count) from `buf` in pieces of at most `max`
// bytes, in order, stopping at the first that fails; adds the calls made
// (a failed one included) to *calls.
inline int WriteInPieces(Sink* sink, const uint8_t* buf, uint64_t count, uint64_t offset,
                         uint64_t max, uint64_t* calls) {
  for (uint64_t done = 0; done < count; done += max) {
    const uint64_t n = std::min(max, count - done);
    ++*calls;
    if (int err = sink->Write(buf + done, static_cast<uint32_t>(n), offset + done, false))
      return err;
  }
  return 0;
}

}  // namespace sdccache
