# Several exports of one plugin (file dir=, and an eval plugin keyed on the
# export name): each export's writes land in its own file, never in another's.
import os
import random
import sys
import traceback

import faultlib
import sdctest
from sdctest import Model, Server, check
from faultlib import check_same, read_file, stats, write_file

SIZE = 1 << 20
NAMES = ["a.img", "b.img", "c.img", "untouched.img"]


def file_dir_plugin(exports):
    return ["file", "dir=" + exports]


def eval_dir_plugin(exports):
    """Like file dir=, but the export name comes from .open's argument (the
    file plugin asks nbdkit_export_name(), which needs a client connection)."""
    f = exports + "/$2"
    return ["eval",
            "open=echo \"$3\"",
            "get_size=stat -Lc %s " + f,
            "pread=dd if=%s skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none" % f,
            "pwrite=dd of=%s seek=$4 conv=notrunc oflag=seek_bytes status=none" % f,
            "flush=sync " + f,
            "can_multi_conn=exit 0"]


def scenario(make_plugin, seed):
    rng = random.Random(seed)
    tmp = faultlib.tmpdir()
    exports = os.path.join(tmp, "exports")
    os.mkdir(exports)
    originals = {}
    for name in NAMES:
        originals[name] = rng.randbytes(SIZE)
        write_file(os.path.join(exports, name), originals[name])
    ctl = os.path.join(tmp, "ctl.sock")
    srv = Server(make_plugin(exports), ["threshold=3", "max-age=0", "control=" + ctl],
                 tmpdir=tmp)
    try:
        with srv:
            exercise(srv, rng, exports, originals, ctl)
    except BaseException:
        print("nbdkit log (%s):\n%s" % (make_plugin.__name__, srv.log_text()[-2000:]),
              file=sys.stderr)
        raise


def exercise(srv, rng, exports, originals, ctl):
    models = {}
    for name in NAMES:
        models[name] = Model(SIZE)
        models[name].write(0, originals[name])
    handles = {name: srv.connect(name) for name in ("a.img", "b.img", "c.img")}
    # Interleaved writes at the same offsets with different data: a
    # batch that went to the wrong file would show at once.
    for i in range(60):
        off = rng.randrange(0, SIZE - 50000)
        n = rng.randint(1, 50000)
        for name in ("a.img", "b.img", "c.img"):
            data = rng.randbytes(n)
            handles[name].pwrite(data, off)
            models[name].write(off, data)
        if i % 7 == 0:
            for name, h in handles.items():
                check_same(h.pread(SIZE, 0), models[name].read(0, SIZE),
                           "read of %s" % name)
    st = stats(ctl)
    check("a.img.batches_flushed" in st and "b.img.batches_flushed" in st,
          "stats do not show per-export counters: %s" % sorted(st)[:8])

    # a.img: client flush, then its file is exact while b and c may not be.
    handles["a.img"].flush()
    check_same(read_file(os.path.join(exports, "a.img")), models["a.img"].read(0, SIZE),
               "a.img after its flush")
    # b.img: no flush, only the disconnect.
    handles["b.img"].shutdown()
    check_same(read_file(os.path.join(exports, "b.img")), models["b.img"].read(0, SIZE),
               "b.img after its disconnect")
    # A second connection to a.img sees a.img, not c.img's buffered data.
    h2 = srv.connect("a.img")
    check_same(h2.pread(SIZE, 0), models["a.img"].read(0, SIZE), "second a.img connection")
    h2.shutdown()
    # c.img: still connected at flush time of the others; flushed by shutdown.
    check_same(handles["c.img"].pread(SIZE, 0), models["c.img"].read(0, SIZE), "c.img")
    handles["a.img"].shutdown()
    handles["c.img"].shutdown()
    check(srv.stop() == 0, "nbdkit exit status")
    for name in NAMES:
        check_same(read_file(os.path.join(exports, name)), models[name].read(0, SIZE),
                   "%s after shutdown" % name)


def main():
    seed = int(os.environ.get("SEED", "55"))
    failed = []
    # Both run even if one fails, so one plugin's problem hides no other.
    for i, make in enumerate([eval_dir_plugin, file_dir_plugin]):
        try:
            scenario(make, seed + i)
            print("%s: ok" % make.__name__)
        except SystemExit as e:
            if e.code:
                failed.append(make.__name__)
        except Exception:
            traceback.print_exc()
            failed.append(make.__name__)
    if failed:
        sdctest.fail("failed: " + ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
