"""Benchmarks: each prints one JSON line per measurement (see the README's table)."""

import resource

from experiments.cli import UserError


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def positive_ints(name: str, values: list[str]) -> list[int]:
    """A list flag's values as positive integers; a UserError naming the flag otherwise."""
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise UserError(
            f"--{name} takes positive integers separated by commas, got {','.join(values)!r}"
        )
    return numbers
