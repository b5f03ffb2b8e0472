"""A WSGI app for the peak-shaving tests (tests/peak_shaving.rs), run by gunicorn.

It measures its own concurrency across all of gunicorn's worker processes: the state
("in flight now", "peak", "served") lives in a file in the directory named by the
PEAK_DIR environment variable, read and written under an exclusive flock.

    GET /sleep[?ms=N]  sleeps N ms (default 200), answers 200 "slept N ms"
    GET /peak          the most /sleep requests the app ever ran at once, as text
    GET /served        how many /sleep requests were started, as text
    GET /reset         resets peak and served (not the in-flight count)

Each worker writes PEAK_DIR/worker-<pid> when it has imported this module, so that the
test harness can wait until every worker is ready.
"""

import fcntl
import os
import time
from urllib.parse import parse_qs

DIR = os.environ["PEAK_DIR"]
STATE = os.path.join(DIR, "state")

with open(os.path.join(DIR, "worker-%d" % os.getpid()), "w") as f:
    f.write("ready\n")


def update(change):
    """Applies `change(now, peak, served) -> (now, peak, served)` to the shared state
    under the lock; returns the new state."""
    fd = os.open(STATE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = os.read(fd, 200).decode() or "0 0 0"
        state = change(*map(int, text.split()))
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, ("%d %d %d" % state).encode())
        return state
    finally:
        os.close(fd)  # releases the lock


def text(start_response, status, body):
    data = (body + "\n").encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/sleep":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        ms = int(query.get("ms", ["200"])[0])
        update(lambda now, peak, served: (now + 1, max(peak, now + 1), served + 1))
        try:
            time.sleep(ms / 1000.0)
        finally:
            update(lambda now, peak, served: (now - 1, peak, served))
        return text(start_response, "200 OK", "slept %d ms" % ms)
    if path == "/peak":
        return text(start_response, "200 OK", str(update(lambda *s: s)[1]))
    if path == "/served":
        return text(start_response, "200 OK", str(update(lambda *s: s)[2]))
    if path == "/reset":
        update(lambda now, peak, served: (now, now, 0))
        return text(start_response, "200 OK", "reset")
    return text(start_response, "404 Not Found", "not found")
