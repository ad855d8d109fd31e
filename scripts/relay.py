"""A TCP relay that adds a fixed delay each way: link latency for the LAN testbed (this kernel has no netem).

    python scripts/relay.py --listen 10.0.0.1:7341 --to 10.0.0.1:7340 --rtt-ms 5

Each byte is forwarded `rtt/2` after it arrived, in order, in each direction, so a connection through the relay
sees `rtt` more round trip. Threads with nanosecond sleeps, not an event loop: epoll's millisecond timeouts would
round a 0.5 ms delay up. A test tool: it never runs inside meshllm.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
import time

CHUNK = 1 << 16
QUEUED = 1024  # chunks in flight per direction (64 MiB at most): the reader waits when the writer is behind


def pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    q: queue.Queue = queue.Queue(maxsize=QUEUED)
    done = threading.Event()  # the writer stopped: the reader must not wait on a full queue forever

    def put(item) -> bool:
        while not done.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def read() -> None:
        try:
            while data := src.recv(CHUNK):
                if not put((time.perf_counter() + delay, data)):
                    return
        except OSError:
            pass
        put((0.0, b""))

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            due, data = q.get()
            if not data:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        done.set()
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen: tuple[str, int], to: tuple[str, int], delay: float) -> None:
    server = socket.create_server(listen, reuse_port=False)
    print(f"relay ready {listen[0]}:{server.getsockname()[1]} -> {to[0]}:{to[1]} +{delay * 2e3:.2f} ms rtt",
          flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(to, timeout=5)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, upstream, delay), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, delay), daemon=True).start()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, type=_addr)
    ap.add_argument("--to", required=True, type=_addr)
    ap.add_argument("--rtt-ms", type=float, required=True, help="round trip added (half each way)")
    args = ap.parse_args()
    try:
        serve(args.listen, args.to, args.rtt_ms / 2e3)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
