"""Opens N keep-alive connections to HOST:PORT, sends one request on each, keeps them
open and idle until stdin closes (or SECONDS pass). Prints 'ready' once all are idle."""
import asyncio, sys

async def one(host, port, conns):
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await r.readexactly(length)
    conns.append((r, w))

async def main():
    host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    conns = []
    for start in range(0, n, 500):
        await asyncio.gather(*(one(host, port, conns) for _ in range(start, min(n, start + 500))))
    print("ready", len(conns), flush=True)
    await asyncio.sleep(seconds)

asyncio.run(main())
