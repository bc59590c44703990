"""The model a ModelConfig names: the Transformer or the recurrent baseline.

Both modules take the same batches and have the same methods (`__call__` for
training; `encode`, `init_cache`, `decode_step` for the search), so everything
downstream - loss, loop, checkpoints, beam search, evaluation - takes either.
"""

from __future__ import annotations

from transformer.config import ModelConfig
from transformer.model import Transformer
from transformer.rnn import RecurrentModel

Model = Transformer | RecurrentModel


def build(config: ModelConfig) -> Model:
    """The encoder-decoder of `config.architecture`."""
    if config.architecture == "lstm":
        return RecurrentModel(config)
    return Transformer(config)
