"""Corpora (TFDS builders), the SentencePiece vocabulary and the grain input pipeline."""

from transformer.progress import hide_library_warning


class DataError(Exception):
    """A dataset cannot be built or read; the message says what to do about it."""


def quiet_tfds() -> None:
    """Before a TFDS builder is made: its "Variant folder ... has no dataset_info.json"
    is logged for a corpus not built yet (a first run, or a build that stopped),
    before the build that follows or its one-line error, which say what matters."""
    hide_library_warning("Variant folder %s has no")
