#!/usr/bin/python3
"""Records client transcripts for the engines' seed corpora (NBD, iSCSI).

A TCP proxy: listens on 127.0.0.1:LISTEN, forwards every connection to
127.0.0.1:TARGET (a Strata serving the exports the fuzz driver knows: for
NBD `disk`, read-write, and `ro`, read-only; for iSCSI
iqn.2026-12.org.strata:fuzz LUN 0, read-write, and LUN 1, read-only; 4 MiB
each), and writes what each client sent to OUTDIR/PREFIX-N. Run real
clients against LISTEN, then stop it with Ctrl-C (or SIGTERM).

    python3 net/fuzz/capture.py LISTEN TARGET OUTDIR PREFIX
"""

import os
import signal
import socket
import sys
import threading


def pipe(src, dst, log):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if log is not None:
                log.write(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if log is not None:
            log.close()


def main():
    listen, target, outdir, prefix = sys.argv[1:5]
    os.makedirs(outdir, exist_ok=True)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(listen)))
    srv.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    n = 0
    while True:
        client, _ = srv.accept()
        server = socket.create_connection(("127.0.0.1", int(target)))
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log = open(os.path.join(outdir, "%s-%d" % (prefix, n)), "wb")
        n += 1
        threading.Thread(target=pipe, args=(client, server, log), daemon=True).start()
        threading.Thread(target=pipe, args=(server, client, None), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
