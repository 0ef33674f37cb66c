# The bench's stacking: nbdkit's stats filter under sdccache must get its statsfile=.
"""`nbdkit --filter=sdccache --filter=stats PLUGIN statsfile=P` is how the
bench counts the plugin's writes below sdccache.  nbdkit hands every
key=value to the outermost filter first, so a filter that claims a key
another filter (or the plugin) needs takes it away from it: the stats filter
then refuses to start ("stats filter requires statsfile parameter").  This
test starts that stack, writes 64 KiB, and reads the stats filter's file to
prove the write reached it.
"""
import os

import sdctest

tmp = sdctest.scratch_dir(prefix="sdcbench-stats-")
stats = os.path.join(tmp, "plugin-stats")
srv = sdctest.Server(["memory", "size=1M"], ["statsfile=" + stats, "statsappend=false"],
                     under=["stats"], tmpdir=tmp, start_timeout=10)
try:
    h = srv.connect()
    h.pwrite(b"\x11" * 65536, 0)
    h.flush()
    h.shutdown()
    rc = srv.stop(timeout=30)
    sdctest.check(rc == 0, "nbdkit exited with %d:\n%s" % (rc, srv.log_text()))
finally:
    srv.kill()
sdctest.check(os.path.exists(stats), "the stats filter wrote no %s" % stats)
text = open(stats).read()
sdctest.check("write: 1 ops" in text and "64.00 KiB" in text,
              "the stats filter did not see the one 64 KiB plugin write:\n" + text)
print("ok: stats filter under sdccache counted the plugin write")
