# A plugin flush that fails is reported to the client's flush and FUA with
# the plugin's errno (ENOSPC from an eval plugin), and recovery needs no restart.
import errno
import os
import random

import nbd

import faultlib
import sdctest
from sdctest import Model, Server, check, expect_errno
from faultlib import check_same, stats, eval_file_plugin, read_file, remove, touch

SIZE = 1 << 20


def main():
    rng = random.Random(int(os.environ.get("SEED", "99")))
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    trig = os.path.join(tmp, "flush-fails")
    ctl = os.path.join(tmp, "ctl.sock")
    touch(trig)
    srv = Server(eval_file_plugin(img, flush_error_file=trig),
                 ["threshold=4", "max-age=0", "control=" + ctl], tmpdir=tmp)
    with srv:
        h = srv.connect()
        model = Model(SIZE)
        for _ in range(10):
            off = rng.randrange(0, SIZE - 40000)
            data = rng.randbytes(rng.randint(1, 40000))
            h.pwrite(data, off)
            model.write(off, data)
        expect_errno(h.flush, errno.ENOSPC, "flush while the plugin's flush fails")
        expect_errno(h.flush, errno.ENOSPC, "second flush while the plugin's flush fails")
        data = rng.randbytes(5000)
        expect_errno(lambda: h.pwrite(data, 12345, nbd.CMD_FLAG_FUA), errno.ENOSPC,
                     "FUA write while the plugin's flush fails")
        got = h.pread(5000, 12345)
        check(got == data or got == model.read(12345, 5000), "failed FUA left a mixed range")
        model.write(12345, got)
        check_same(h.pread(SIZE, 0), model.read(0, SIZE), "read while flush fails")
        st = stats(ctl)
        check(int(st["flush_errors"]) >= 3, "flush_errors not counted: %s" % st["flush_errors"])
        check(st["last_error"] == os.strerror(errno.ENOSPC), "last_error: %s" % st["last_error"])

        remove(trig)
        h.flush()
        check_same(read_file(img), model.read(0, SIZE), "disk after recovered flush")
        h.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
    print("error-flush: ok")


if __name__ == "__main__":
    main()
