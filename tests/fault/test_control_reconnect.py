# A control client that connects again as soon as its last connection has
# ended is served, also with 15 other clients connected: its old connection
# is no longer counted once it has seen it end.  An LD_PRELOAD shim (argv[1])
# makes the close of each control client's socket return 300 ms late, as a
# preempted thread would.
import os
import socket
import sys

import faultlib
import sdctest

MAX_CLIENTS = 16  # ControlSocket::kMaxClients


def session(ctl):
    """Sends `help`, ends its input, and returns all it was sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        # Blocking: with a timeout set, a connect that finds the listen
        # backlog full (the held clients not all accepted yet) fails with
        # EAGAIN at once instead of waiting.
        c.connect(ctl)
        c.settimeout(10)
        got = b""
        try:
            c.sendall(b"help\n")
            c.shutdown(socket.SHUT_WR)
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    return got
                got += chunk
        except (BrokenPipeError, ConnectionResetError):
            return got


def main(shim):
    tmp = faultlib.tmpdir()
    ctl = os.path.join(tmp, "ctl.sock")
    env = dict(os.environ, LD_PRELOAD=shim, SDCCACHE_SLOW_CLOSE_PATH=ctl)
    with sdctest.start_server(["memory", "1M"], ["control=" + ctl], tmpdir=tmp, env=env) as srv:
        held = []
        for _ in range(MAX_CLIENTS - 1):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(ctl)
            held.append(c)
        # The 16th slot: each session must find it free, though the
        # connection before it (the one before, or the readiness probe of
        # start_server) has only just ended.
        for i in range(5):
            got = session(ctl)
            sdctest.check(got.startswith(b"commands") and got.endswith(b"ok\n"),
                          "session %d, right after a connection before it ended: %r" % (i, got))
        for c in held:
            c.close()
        sdctest.check(srv.stop() == 0, "nbdkit exit status")
    print("5 sessions in a row beside %d held clients: all served" % (MAX_CLIENTS - 1))


if __name__ == "__main__":
    main(sys.argv[1])
