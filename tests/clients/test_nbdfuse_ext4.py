# ext4 on nbdfuse over sdccache: mkfs, fuse2fs, files, clean shutdown, e2fsck and checksums.
import hashlib
import os
import random
import subprocess
import sys

import clientlib
from clientlib import Background, check, run, wait_until
import sdctest

SIZE = 128 << 20


class Stack:
    """nbdkit + nbdfuse (+ fuse2fs) for one mount, each process by PID."""

    def __init__(self, tmp, disk, tag):
        self.tmp = tmp
        self.tag = tag
        os.mkdir(os.path.join(tmp, "srv-" + tag))
        self.srv = clientlib.start_server(["file", disk], ["threshold=8", "max-age=1s"],
                                          tmpdir=os.path.join(tmp, "srv-" + tag))
        self.nbd_dir = os.path.join(tmp, "nbd-" + tag)
        self.fs_dir = os.path.join(tmp, "fs-" + tag)
        os.mkdir(self.nbd_dir)
        os.mkdir(self.fs_dir)
        # Should a check below fail, sdctest kills the processes at exit
        # and lazily unmounts these.
        sdctest.track_mount(self.fs_dir)
        sdctest.track_mount(self.nbd_dir)
        self.image = os.path.join(self.nbd_dir, "nbd")
        self.fuse = Background(["nbdfuse", self.nbd_dir, self.srv.uri],
                               os.path.join(tmp, "nbdfuse-" + tag + ".log"))
        wait_until(lambda: not self.fuse.alive() or os.path.ismount(self.nbd_dir), 20,
                   "nbdfuse mount on " + self.nbd_dir)
        check(self.fuse.alive(), "nbdfuse exited:\n" + self.fuse.log_text())
        check(os.path.getsize(self.image) == SIZE, "nbdfuse file has the wrong size")
        self.fs = None

    def mount_fs(self, readonly=False):
        opts = "fakeroot" + (",ro" if readonly else "")
        self.fs = Background(["fuse2fs", self.image, self.fs_dir, "-o", opts, "-f"],
                             os.path.join(self.tmp, "fuse2fs-%s.log" % self.tag))
        wait_until(lambda: not self.fs.alive() or os.path.ismount(self.fs_dir), 20,
                   "fuse2fs mount on " + self.fs_dir)
        check(self.fs.alive(), "fuse2fs exited:\n" + self.fs.log_text())

    def unmount_all(self):
        """Unmounts in order; each daemon must exit by itself, cleanly."""
        if self.fs is not None:
            run([sdctest.fusermount(), "-u", self.fs_dir], timeout=30)
            rc = self.fs.wait_exit(60, "fuse2fs")
            check(rc == 0, "fuse2fs exit status %d:\n%s" % (rc, self.fs.log_text()))
            self.fs = None
        run([sdctest.fusermount(), "-u", self.nbd_dir], timeout=30)
        rc = self.fuse.wait_exit(60, "nbdfuse")
        check(rc == 0, "nbdfuse exit status %d:\n%s" % (rc, self.fuse.log_text()))
        rc = self.srv.stop()
        check(rc == 0, "nbdkit exit status %d:\n%s" % (rc, self.srv.log_text()))

    def kill_all(self):
        """Cleanup after a failure: lazy-unmount, then kill by PID (never
        fails, so that every step runs)."""
        for d in (self.fs_dir, self.nbd_dir):
            if sdctest.mounted(d):
                try:
                    subprocess.run([sdctest.fusermount(), "-u", "-z", d], timeout=10,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    print("fusermount -u -z %s timed out" % d)
        for p in (self.fs, self.fuse):
            if p is not None:
                p.kill()
        self.srv.kill()


def write_files(root, rng):
    """Creates a small tree of random files; returns {relative path: sha256}."""
    sums = {}
    os.makedirs(os.path.join(root, "a", "b"))
    sizes = [0, 1, 4095, 4096, 65537, 1 << 20, 3 * (1 << 20) + 123]
    for i, n in enumerate(sizes * 2):
        rel = os.path.join("a" if i % 2 else "a/b", "file%02d.bin" % i)
        data = rng.randbytes(n)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    # Rewrite part of one file in place: the newest content must win.
    rel = "a/file01.bin"
    with open(os.path.join(root, rel), "r+b") as f:
        f.write(b"\xff" * 1)
    sums[rel] = hashlib.sha256(b"\xff").hexdigest()
    return sums


def main():
    clientlib.require("nbdfuse", "fuse2fs", "mkfs.ext4", "e2fsck", "debugfs", sdctest.fusermount())
    check(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    tmp = sdctest.scratch_dir(prefix="sdc-nbdfuse-")
    disk = sdctest.make_image(tmp, SIZE)
    rng = random.Random(77)

    stack = Stack(tmp, disk, "1")
    try:
        run(["mkfs.ext4", "-q", "-F", stack.image], timeout=60)
        stack.mount_fs()
        sums = write_files(stack.fs_dir, rng)
        for rel, want in sums.items():
            got = clientlib.sha256_file(os.path.join(stack.fs_dir, rel))
            check(got == want, "%s reads back wrong through the mount" % rel)
        stack.unmount_all()
    finally:
        stack.kill_all()

    # Read the backing file directly: clean filesystem, same contents.
    out, _ = run(["e2fsck", "-fn", disk], timeout=60)
    print(out.strip().splitlines()[-1])
    for rel, want in sums.items():
        data = debugfs_cat(disk, "/" + rel)
        check(hashlib.sha256(data).hexdigest() == want, "debugfs: %s differs on disk" % rel)

    # Restart nbdkit on the same file and mount again, read-only.
    stack = Stack(tmp, disk, "2")
    try:
        stack.mount_fs(readonly=True)
        for rel, want in sums.items():
            got = clientlib.sha256_file(os.path.join(stack.fs_dir, rel))
            check(got == want, "%s differs after the restart" % rel)
        stack.unmount_all()
    finally:
        stack.kill_all()
    run(["e2fsck", "-fn", disk], timeout=60)
    print("PASS: ext4 via nbdfuse + fuse2fs over sdccache, %d files intact" % len(sums))


def debugfs_cat(image, path):
    """debugfs -R 'cat PATH' IMAGE, bounded; returns the file's bytes."""
    p = subprocess.run(["debugfs", "-R", "cat " + path, image], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    check(p.returncode == 0, "debugfs cat %s: %s" % (path, p.stderr.decode(errors="replace")))
    return p.stdout


if __name__ == "__main__":
    main()
    sys.exit(0)
