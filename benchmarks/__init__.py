"""Benchmarks: each prints one JSON line per measurement (see the README's table)."""

import resource

from experiments import tcmalloc

tcmalloc.use_tcmalloc()  # before jax is imported: see experiments/tcmalloc.py

import jax.numpy as jnp  # noqa: E402

from experiments import cli  # noqa: E402
from experiments.cli import UserError  # noqa: E402
from transformer import decoding, progress  # noqa: E402
from transformer.config import EOS_ID  # noqa: E402


def run(main) -> None:
    """cli.run for a benchmark: stdout is its JSON lines, so what it says while it
    builds data or a vocabulary goes to stderr."""
    progress.to_stderr()
    cli.run(main)


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


def eos_only_at_the_end(step_fn, steps: int):
    """step_fn with EOS impossible before position steps - 1: a fixed amount of work."""

    def wrapped(cache, tokens, step):
        out, cache = step_fn(cache, tokens, step)
        unnormalized = isinstance(out, decoding.Logits)
        scores = out.logits if unnormalized else out
        blocked = (jnp.arange(scores.shape[-1]) == EOS_ID) & (step + 1 < steps)
        scores = jnp.where(blocked, -1e9, scores)
        return (decoding.Logits(scores) if unnormalized else scores), cache

    return wrapped
