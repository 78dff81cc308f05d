"""A dependency-free progress bar on stderr."""
import sys
import time


def progress(items, total: int, label: str = "", enabled: bool = True):
    """Yield from `items`, redrawing `label [#####     ] done/total, rate, ETA` on stderr."""
    start = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        if enabled:
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done)
            bar = "#" * (20 * done // total) + " " * (20 - 20 * done // total)
            print(f"\r{label} [{bar}] {done}/{total} {done / elapsed:.1f}/s ETA {eta:.0f}s", end="",
                  file=sys.stderr, flush=True)
    if enabled:
        print(file=sys.stderr)
