"""Benchmarks: each prints one JSON line per measurement (see the README's table)."""

import resource

import jax.numpy as jnp
import numpy as np

from experiments.cli import UserError
from transformer.config import EOS_ID


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


def packed_batch(rows: int, length: int, vocab: int, segments: int = 4) -> dict:
    """Rows full of `segments` examples each, random ids (the content does not matter)."""
    rng = np.random.default_rng(0)
    size = length // segments
    positions = np.tile(np.arange(size), segments)[None].repeat(rows, 0)
    segment_ids = np.repeat(np.arange(1, segments + 1), size)[None].repeat(rows, 0)
    batch = {
        "inputs_positions": positions,
        "targets_positions": positions,
        "inputs_segmentation": segment_ids,
        "targets_segmentation": segment_ids,
    }
    for name in ("inputs", "targets"):
        batch[name] = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    return {k: v.astype(np.int32) for k, v in batch.items()}


def eos_only_at_the_end(step_fn, steps: int):
    """step_fn with EOS impossible before position steps - 1: a fixed amount of work."""

    def wrapped(cache, tokens, step):
        log_probs, cache = step_fn(cache, tokens, step)
        blocked = (jnp.arange(log_probs.shape[-1]) == EOS_ID) & (step + 1 < steps)
        return jnp.where(blocked, -1e9, log_probs), cache

    return wrapped
