"""Cloud TPU accelerator types: how many hosts a slice has, which runtime it boots.

An accelerator type is `<generation>-<size>`. What the size counts depends on
the generation: TensorCores for v2, v3, v4 and v5p (two per chip, four chips
per host, so 8 per host); chips for v5e (`v5litepod`) and v6e, where slices of
up to 8 chips sit on one host and larger slices have 4 chips per host.
"""

from __future__ import annotations

import dataclasses
import re

from launch.cli import UserError

# The runtime image Google recommends for JAX on each generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
_COUNTS_CORES = ("v2", "v3", "v4", "v5p")
_ALIASES = {"v5e": "v5litepod"}  # the marketing name; gcloud wants v5litepod
_PATTERN = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
EXAMPLES = "v4-8, v4-32, v5litepod-8 (v5e), v5p-8, v6e-8"


@dataclasses.dataclass(frozen=True)
class TpuType:
    """One accelerator type, e.g. TpuType('v4', 8) for v4-8."""

    generation: str
    size: int

    @property
    def name(self) -> str:
        """The name gcloud takes as --accelerator-type."""
        return f"{self.generation}-{self.size}"

    @property
    def hosts(self) -> int:
        """VMs (JAX processes) in the slice."""
        if self.generation in _COUNTS_CORES:
            return max(1, self.size // 8)
        return 1 if self.size <= 8 else self.size // 4

    @property
    def runtime_version(self) -> str:
        """The default --version (TPU software image) for this generation."""
        return RUNTIME_VERSIONS[self.generation]


def parse(text: str) -> TpuType:
    """TpuType from 'v4-8', 'v5litepod-16', 'v5e-8', ...; UserError if malformed."""
    match = _PATTERN.match(text.strip().lower())
    generation = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if generation not in RUNTIME_VERSIONS:
        raise UserError(
            f"--accelerator_type={text!r} is not a TPU type like {EXAMPLES} "
            f"(generations: {', '.join(RUNTIME_VERSIONS)})"
        )
    size = int(match.group(2))
    if not _valid_size(generation, size):
        raise UserError(f"--accelerator_type={text!r}: {generation} has no slice of size {size}")
    return TpuType(generation, size)


# v5e and v6e come in these chip counts only (a v5litepod-12 does not exist).
_CHIP_SLICES = (1, 4, 8, 16, 32, 64, 128, 256)


def _valid_size(generation: str, size: int) -> bool:
    """Whole hosts of 8 cores (v2-v5p), or one of the chip counts of v5e and v6e."""
    if generation in _COUNTS_CORES:
        return size >= 8 and size % 8 == 0
    return size in _CHIP_SLICES
