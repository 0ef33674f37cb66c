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
    with sdctest.connect_unix(ctl, 10) as c:
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


def check_served(got, what):
    sdctest.check(got.startswith(b"commands") and got.endswith(b"ok\n"), "%s: %r" % (what, got))


def main(shim):
    tmp = faultlib.tmpdir()
    ctl = os.path.join(tmp, "ctl.sock")
    env = dict(os.environ, LD_PRELOAD=shim, SDCCACHE_SLOW_CLOSE_PATH=ctl)
    with sdctest.start_server(["memory", "1M"], ["control=" + ctl], tmpdir=tmp, env=env) as srv:
        # start_server's readiness probe, accepted before this first
        # session, has ended on the server too: only the accepting thread is
        # left (a client's thread has its name, from the thread starting it).
        check_served(session(ctl), "the first session")
        sdctest.wait_until(lambda: sdctest.threads_named(srv.proc.pid, "sdccache-ctl") == 1,
                           20, "the control clients before to end")
        held = []
        for _ in range(MAX_CLIENTS - 1):  # each counted once answered
            c = sdctest.connect_unix(ctl, 10)
            c.sendall(b"help\n")
            got = b""
            while not got.endswith(b"ok\n"):
                chunk = c.recv(4096)
                sdctest.check(chunk, "a held client was not answered: %r" % got)
                got += chunk
            held.append(c)
        # The 16th slot: each session must find it free, though the one
        # before it has only just ended.
        for i in range(5):
            check_served(session(ctl), "session %d, right after the one before it ended" % i)
        for c in held:
            c.close()
        sdctest.check(srv.stop() == 0, "nbdkit exit status")
    print("5 sessions in a row beside %d held clients: all served" % (MAX_CLIENTS - 1))


if __name__ == "__main__":
    main(sys.argv[1])
