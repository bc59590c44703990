"""Translation quality (sacreBLEU, chrF, paper-style BLEU) and summary writing.

Two BLEU figures, never to be confused:
  * sacreBLEU: detokenized, cased, 13a tokenization, with its signature. This
    is the comparable figure (Post, 2018).
  * paper-style BLEU: Moses-tokenized text with hyphenated compounds split
    (a-b -> a ##AT##-##AT## b), scored on the tokens, as tensor2tensor's
    get_ende_bleu.sh did for the paper's Table 2. It runs higher than
    sacreBLEU (about +0.7 on newstest2014 EN-DE) and is not comparable to it.
"""

from __future__ import annotations

import json
import re
import time

import sacrebleu
from etils import epath

# tensor2tensor's get_ende_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'.
_COMPOUND = re.compile(rb"(\S)-(\S)")  # on UTF-8 bytes, as perl without -C reads


def sacre_bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """(sacreBLEU, its signature) of detokenized hypotheses against one reference each."""
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return score.score, str(metric.get_signature())


def chrf(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    metric = sacrebleu.CHRF()
    score = metric.corpus_score(hypotheses, [references])
    return score.score, str(metric.get_signature())


def split_compounds(tokenized: str) -> str:
    """'Wort-Spiel' -> 'Wort ##AT##-##AT## Spiel', exactly as tensor2tensor's script.

    Its one left-to-right pass takes the characters either side of a hyphen
    into the match, so a character is never the end of two matches: in
    'x-y-z' only the first hyphen is split ('x ##AT##-##AT## y-z'), and 'a--b'
    becomes 'a ##AT##-##AT## -b'. Python's re.sub scans the same way. The
    script's perl reads bytes, so a letter of two bytes between hyphens ends
    one match and starts the next: 'a-ü-b' has both hyphens split. The bytes
    inserted sit beside a hyphen, never inside a character.
    """
    split = _COMPOUND.sub(rb"\1 ##AT##-##AT## \2", tokenized.encode("utf-8"))
    return split.decode("utf-8")


def paper_bleu(hypotheses: list[str], references: list[str], lang: str) -> float:
    """BLEU on Moses-tokenized, compound-split text (the paper's figure; not sacreBLEU).

    As tensor2tensor's get_ende_bleu.sh: tokenizer.perl's defaults (its
    escaping of & ' " < > | [ ] included), then `split_compounds`, then BLEU
    on the whitespace-separated tokens, unsmoothed (multi-bleu.perl's: 0 when
    some n-gram order has no match).
    """
    from sacremoses import MosesTokenizer  # imported here: 0.2 s that every run would pay

    tokenizer = MosesTokenizer(lang=lang)

    def prepare(text: str) -> str:
        return split_compounds(tokenizer.tokenize(text, return_str=True, escape=True))

    hyps = [prepare(h) for h in hypotheses]
    refs = [prepare(r) for r in references]
    bleu = sacrebleu.BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score(hyps, [refs]).score


def evaluate_translations(hypotheses: list[str], references: list[str], lang: str) -> dict:
    """All three figures, labelled."""
    bleu, bleu_signature = sacre_bleu(hypotheses, references)
    chrf_score, chrf_signature = chrf(hypotheses, references)
    return {
        "sacrebleu": bleu,
        "sacrebleu_signature": bleu_signature,
        "chrf": chrf_score,
        "chrf_signature": chrf_signature,
        "paper_bleu_tokenized": paper_bleu(hypotheses, references, lang),
        "sentences": len(hypotheses),
    }


class SummaryWriter:
    """Scalars to TensorBoard event files (no TensorFlow needed) and to metrics.jsonl.

    Events are written in the calling thread and flushed with each call, so an
    error (a full disk) is raised where it happens. tensorboardX's own writer
    queues events for a thread of its own; when that thread dies, the queue
    fills and the next write blocks forever.

    Only the process that is told it is the chief writes; others do nothing.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX.event_file_writer import EventsWriter

        path = self.path = epath.Path(workdir)
        (path / "tensorboard").mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(path / "tensorboard" / "events"))
        jsonl = path / "metrics.jsonl"
        # A run killed mid-write leaves a last line without its end: new records
        # start on a line of their own, so that one bad line stays one.
        earlier = jsonl.read_bytes() if jsonl.exists() else b""
        torn = bool(earlier) and not earlier.endswith(b"\n")
        self._jsonl = jsonl.open("a")
        if torn:
            self._jsonl.write("\n")

    def write(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for name, value in scalars.items():
            if isinstance(value, int | float):
                summary = scalar(f"{prefix}{name}", value)
                self._events.write_event(Event(wall_time=now, step=step, summary=summary))
        self._events.flush()
        record = {"step": step, "time": now, **{f"{prefix}{k}": v for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._events.close()
            self._jsonl.close()
