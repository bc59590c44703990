"""Evaluation during and after training: validation loss/perplexity and BLEU.

Every validation example counts (none dropped); batches are bucketed by length
so that only a few shapes are compiled. BLEU decodes with beam search and
scores detokenized text with sacreBLEU (transformer/metrics.py).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh

from transformer import metrics, sharding
from transformer.architecture import Model
from transformer.config import DataConfig, DecodeConfig, TrainConfig
from transformer.data import datasets, pipeline
from transformer.data.vocab import Vocabulary
from transformer.progress import Meter
from transformer.train import eval_step
from transformer.translation import Translator

EVAL_TOKENS_PER_BATCH = 8192


class Evaluator:
    """Validation loss every few steps; a full translation of a split at the end."""

    def __init__(
        self,
        model: Model,
        vocab: Vocabulary,
        mesh: Mesh,
        *,
        data: DataConfig,
        train: TrainConfig,
        decode: DecodeConfig,
    ):
        self.model, self.vocab, self.mesh = model, vocab, mesh
        self.data, self.train, self.decode = data, train, decode
        self._batches = None
        self._step = jax.jit(
            functools.partial(eval_step, model=model, smoothing=train.label_smoothing)
        )

    def _validation_batches(self):
        if self._batches is None:
            source = datasets.load_split(self.data, "validation")
            self._batches = pipeline.eval_batches(
                source,
                self.vocab,
                self.model.config.max_len,
                EVAL_TOKENS_PER_BATCH,
                row_multiple=self.mesh.shape["data"] * self.mesh.shape["fsdp"],
            )
        return self._batches

    def loss(self, params) -> dict[str, float]:
        """Loss, perplexity and accuracy over the whole validation split."""
        totals = {"loss": 0.0, "nll": 0.0, "correct": 0.0, "tokens": 0.0}
        for batch in self._validation_batches():
            placed = sharding.global_batch(self.mesh, batch, process_local=False)
            sums = jax.device_get(self._step(params, placed))
            for k in totals:
                totals[k] += float(sums[k])
        tokens = max(totals["tokens"], 1.0)
        return {
            "loss": totals["loss"] / tokens,
            "nll": totals["nll"] / tokens,
            "perplexity": math.exp(min(totals["nll"] / tokens, 50)),
            "accuracy": totals["correct"] / tokens,
        }

    def bleu(
        self, params, split: str, limit: int | None = None, decode: DecodeConfig | None = None
    ) -> tuple[dict, list, list, list]:
        """(scores, sources, hypotheses, references) on the first `limit` examples of a split,
        decoded as `decode` says (by default the run's decoding).

        A whole split shows its progress (sentences done, rate, ETA).
        """
        source = datasets.load_split(self.data, split)
        n = len(source) if limit is None else min(limit, len(source))
        pairs = source.texts(range(n))
        sources = [s for s, _ in pairs]
        references = [t for _, t in pairs]
        meter = None if limit else Meter(f"translating the {split} split", n, "sentences")
        translator = Translator(
            self.model, params, self.vocab, decode or self.decode, mesh=self.mesh,
            on_progress=meter and meter.in_proportion(n),
        )  # fmt: skip
        hypotheses = translator.translate(sources)
        if meter:
            meter.finish()
        lang = self.data.languages()[1]
        return (
            metrics.evaluate_translations(hypotheses, references, lang),
            sources,
            hypotheses,
            references,
        )

    def validate(self, params) -> dict[str, float]:
        """Validation loss, and sacreBLEU/chrF on a subset when configured.

        The subset is decoded without MBR's samples: they make the final
        evaluation's choice, and during training they would cost most of each
        validation (on the demo's CPU, 34 s of 41 for 100 sentences), time
        taken from the training budget.
        """
        result = self.loss(params)
        if self.train.eval_bleu_sentences:
            without_samples = self.decode.replace(mbr_samples=0)
            scores, *_ = self.bleu(
                params, "validation", self.train.eval_bleu_sentences, without_samples
            )
            result.update(bleu=scores["sacrebleu"], chrf=scores["chrf"])
        if jax.process_index() == 0:
            shown = " | ".join(f"{k} {v:.3f}" for k, v in result.items())
            print(f"  validation: {shown}", flush=True)
        return result

    def final(self, params, samples: int = 5) -> dict:
        """Validation loss, then BLEU/chrF on the final split, with a few sample translations."""
        result = {f"validation_{k}": v for k, v in self.loss(params).items()}
        split = self.train.final_eval_split
        if split:
            scores, sources, hypotheses, references = self.bleu(params, split)
            result.update({f"{split}_{k}": v for k, v in scores.items()})
            picks = np.linspace(0, len(sources) - 1, num=min(samples, len(sources)), dtype=int)
            result["samples"] = [
                {"source": sources[i], "translation": hypotheses[i], "reference": references[i]}
                for i in picks
            ]
            if jax.process_index() == 0:
                _print_final(split, scores, result["samples"])
        return result


def _print_final(split: str, scores: dict, samples: list[dict]) -> None:
    print(
        f"{split}: sacreBLEU {scores['sacrebleu']:.2f} ({scores['sacrebleu_signature']})",
        flush=True,
    )
    print(f"{split}: chrF {scores['chrf']:.2f} ({scores['chrf_signature']})")
    print(
        f"{split}: tokenized BLEU with compound splitting (paper-style, not comparable "
        f"to sacreBLEU) {scores['paper_bleu_tokenized']:.2f}"
    )
    for s in samples:
        print(
            f"  source:      {s['source']}\n  translation: {s['translation']}\n"
            f"  reference:   {s['reference']}"
        )
