"""`ding_de_en`: a TFDS builder over the German-English dictionary "Ding".

The dictionary by Frank Richter (GPL-2+) ships with Debian and Ubuntu as the
package `trans-de-en` (file /usr/share/trans/de-en, about 206k lines); any
copy of that file in a `manual_dir` works too. A line reads

    German part | German part :: English part | English part

The ' | ' parts are aligned (a headword, its plural, example phrases, example
sentences); inside a part, '; ' separates alternatives (synonyms). Grammatical
annotations in braces, brackets and angle brackets ({m}, {pl}, {vt}, [ugs.],
<Aalmolch>) are removed; everything else (umlauts, punctuation, casing,
parenthesized glosses) is kept.

Alternatives are not aligned one to one, so each part yields
max(#German, #English) pairs: the i-th German alternative with the i-th English
one, the shorter side repeating its last alternative. Every word of the
dictionary is thus seen at least once; `alternative` records i so that a
pipeline can keep only the first (i == 0) if it wants cleaner pairs.

A pair is a full sentence when both sides have at least three words, end in
'.', '!' or '?' (possibly followed by a closing quote or parenthesis), and the
English side starts with a capital letter (which rules out "to do sth.").

Splits: `validation` and `test` hold full sentences only, about 1000 each,
chosen by a hash of the German side; `train` holds everything else, minus any
pair whose German side is a held-out sentence, so that no German sentence is
in two splits. Exact duplicate pairs are kept once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from transformer.data import DataError
from transformer.progress import Meter

SYSTEM_PATH = "/usr/share/trans/de-en"
MANUAL_NAMES = ("de-en", "de-en.txt")
HELD_OUT_FRACTION = 0.05  # of full sentences, per held-out split (~1050 of ~21000)

# An annotation with the space before it: "erlegt [Ös.]." becomes "erlegt.".
_ANNOTATION = re.compile(r"\s*(?:\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>)")
_SENTENCE_END = re.compile(r"[.!?][\"'”“»«)]*$")


def clean(text: str) -> str:
    """Removes {..}, [..] and <..> annotations and collapses whitespace."""
    return " ".join(_ANNOTATION.sub("", text).split())


def is_sentence(german: str, english: str) -> bool:
    """Whether a pair is a full example sentence rather than a phrase."""
    return bool(
        _SENTENCE_END.search(german)
        and _SENTENCE_END.search(english)
        and english[:1].isupper()
        and len(german.split()) >= 3
        and len(english.split()) >= 3
    )


def parse_line(line: str) -> list[tuple[str, str, int]]:
    """One dictionary line -> [(german, english, alternative index)].

    Comment lines and lines whose sides have different numbers of parts give
    no pairs.
    """
    if line.startswith("#") or " :: " not in line:
        return []
    german, _, english = line.rstrip("\n").partition(" :: ")
    german_parts, english_parts = german.split(" | "), english.split(" | ")
    if len(german_parts) != len(english_parts):
        return []
    pairs = []
    for de_part, en_part in zip(german_parts, english_parts, strict=True):
        de_alts = [a for a in (clean(x) for x in de_part.split("; ")) if a]
        en_alts = [a for a in (clean(x) for x in en_part.split("; ")) if a]
        if not de_alts or not en_alts:
            continue
        for i in range(max(len(de_alts), len(en_alts))):
            de = de_alts[min(i, len(de_alts) - 1)]
            en = en_alts[min(i, len(en_alts) - 1)]
            pairs.append((de, en, i))
    return pairs


def held_out_split(german: str) -> str | None:
    """'test', 'validation' or None, from a stable hash of the German sentence."""
    digest = hashlib.sha256(german.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < HELD_OUT_FRACTION:
        return "test"
    if u < 2 * HELD_OUT_FRACTION:
        return "validation"
    return None


def read_pairs(path: epath.Path) -> list[tuple[str, str, int]]:
    """All unique (german, english, alternative) pairs of a dictionary file, in file order."""
    pairs: dict[tuple[str, str], int] = {}
    text = path.read_bytes().decode("utf-8", errors="replace")
    for line in text.splitlines():
        for de, en, alt in parse_line(line):
            pairs.setdefault((de, en), alt)
    if not pairs:
        raise DataError(
            f"{path} holds no dictionary lines ('german :: english'); give the Ding "
            "file of the trans-de-en package (or a copy) as --manual_dir"
        )
    return [(de, en, alt) for (de, en), alt in pairs.items()]


def split_pairs(pairs: list[tuple[str, str, int]]) -> dict[str, list[tuple[str, str, int]]]:
    """Assigns pairs to train/validation/test; no German sentence in two splits."""
    splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    held_out_german = set()
    for de, en, alt in pairs:
        split = held_out_split(de) if is_sentence(de, en) else None
        if split is not None:
            splits[split].append((de, en, alt))
            held_out_german.add(de)
    splits["train"] = [p for p in pairs if p[0] not in held_out_german]
    return splits


def find_corpus(manual_dir: str | None) -> epath.Path:
    """The dictionary file: in manual_dir if given, else the Debian package's."""
    if manual_dir:
        if not epath.Path(manual_dir).is_dir():
            raise DataError(
                f"--manual_dir={manual_dir} is not a folder; give the folder that holds "
                f"a copy of {SYSTEM_PATH}, or leave the flag out to use that file"
            )
        for name in MANUAL_NAMES:
            candidate = epath.Path(manual_dir) / name
            if candidate.exists():
                return candidate
        raise DataError(
            f"no Ding dictionary file ({' or '.join(MANUAL_NAMES)}) in --manual_dir={manual_dir}; "
            f"copy {SYSTEM_PATH} from the trans-de-en package there"
        )
    if epath.Path(SYSTEM_PATH).exists():
        return epath.Path(SYSTEM_PATH)
    raise DataError(
        f"{SYSTEM_PATH} not found: install it with `sudo apt-get install trans-de-en` "
        "(Debian/Ubuntu), or put a copy of that file named de-en in a folder given as "
        "--manual_dir"
    )


class _LocalInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset that TFDS's GCS bucket does not hold."""

    def initialize_from_bucket(self) -> None:
        # TFDS calls this for every builder whose data is not prepared yet; its own
        # version makes an empty tempfile.mkdtemp("tfds") folder and never removes it.
        return None


class DingDeEn(tfds.core.GeneratorBasedBuilder):
    """German-English pairs from the Ding dictionary; sentences held out for evaluation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pairs by aligned part and alternative; sentence-only eval splits."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Install the Debian/Ubuntu package trans-de-en (which provides {SYSTEM_PATH}), "
        "or copy that file, named de-en, into the manual_dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "de": tfds.features.Text(),
                    "en": tfds.features.Text(),
                    "sentence": np.bool_,
                    "alternative": np.int32,
                }
            ),
            supervised_keys=("de", "en"),
            homepage="https://dict.tu-chemnitz.de/",
            license="GPL-2.0-or-later",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = None
        try:
            manual_dir = dl_manager.manual_dir  # raises if the dir was given but is missing
        except AssertionError:
            pass
        path = find_corpus(str(manual_dir) if manual_dir and manual_dir.exists() else None)
        splits = split_pairs(read_pairs(path))
        return {name: self._generate_examples(name, pairs) for name, pairs in splits.items()}

    def _generate_examples(self, split: str, pairs) -> Iterator[tuple[int, dict]]:
        meter = Meter(f"writing ding_de_en's {split} split", len(pairs), "pairs")
        for key, (de, en, alt) in enumerate(pairs):
            yield key, {"de": de, "en": en, "sentence": is_sentence(de, en), "alternative": alt}
            meter.advance(1)
        meter.finish()
