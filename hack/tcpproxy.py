"""A TCP proxy: `tcpproxy.py LISTEN_IP:PORT TARGET_IP:PORT --tag TAG` (started by hack/cluster).

The API server listens on 127.0.0.1 only, which a real node's netns (kube-proxy, pods) cannot reach: its
127.0.0.1 is its own. hack/cluster runs this proxy on the cluster's host address (a dummy link every
node routes to its veth's host end, hack/realnodes.py) to the API server's loopback port; the `kubernetes`
Service's endpoint is that address (--advertise-address). Bytes are copied as they are: TLS runs end to
end between the client and the API server, which sees the client certificates and tokens itself.
`--tag` is only there for `hack/cluster down` to know the process as this state dir's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(pipe(c_reader, t_writer), pipe(t_reader, c_writer))
        finally:
            for w in (c_writer, t_writer):
                w.close()

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"proxying {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}", flush=True)
        await stop.wait()


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("listen", type=addr)
    parser.add_argument("target", type=addr)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.target))


if __name__ == "__main__":
    main()
