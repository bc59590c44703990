"""Benchmarks: each prints one JSON line per measurement (see the README's table)."""

import resource


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
