"""Corpora (TFDS builders), the SentencePiece vocabulary and the grain input pipeline."""


class DataError(Exception):
    """A dataset cannot be built or read; the message says what to do about it."""
