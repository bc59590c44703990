"""The ding_de_en builder: parsing, annotation stripping, disjoint deterministic splits."""

import hashlib
import os
import tempfile

import pytest

from transformer.config import DataConfig
from transformer.data import DataError, datasets, ding


def test_annotations_are_stripped_and_text_kept():
    assert ding.clean("Aal {m} (auf der Speisekarte) [cook.]") == "Aal (auf der Speisekarte)"
    assert ding.clean("Größe {f} [ugs.] <Groesse>") == "Größe"
    # The space an annotation leaves before punctuation goes with it.
    assert ding.clean("Er hat die Kaution erlegt [Ös.].") == "Er hat die Kaution erlegt."
    assert ding.clean("„Schön!“, sagte sie.") == "„Schön!“, sagte sie."


def test_parts_are_aligned_and_alternatives_paired():
    line = (
        "Sonnenbräune {f}; Bräune {f} | eine tiefe Bräune haben :: suntan; tan | "
        "to have a deep tan; to be very tanned"
    )
    assert ding.parse_line(line) == [
        ("Sonnenbräune", "suntan", 0),
        ("Bräune", "tan", 1),
        ("eine tiefe Bräune haben", "to have a deep tan", 0),
        ("eine tiefe Bräune haben", "to be very tanned", 1),  # the shorter side repeats
    ]


def test_comments_and_misaligned_lines_give_nothing():
    assert ding.parse_line("# Version :: devel 2023-01-30") == []
    assert ding.parse_line("falsch aligned | zweiter Teil :: wrongly aligned") == []
    assert ding.parse_line("no separator here") == []


@pytest.mark.parametrize(
    "german, english, expected",
    [
        ("Der Hund sieht das Haus.", "The dog sees the house.", True),
        ("Haben Sie etwas gegen Sonnenbrand?", "Have you anything for sunburn?", True),
        ("etw. öffnen", "to open sth.", False),  # ends in '.', but a phrase
        ("jdm. etw. geben.", "to give sb. sth.", False),
        ("Aal blau", "Eel au bleu", False),
    ],
)
def test_sentence_detection(german, english, expected):
    assert ding.is_sentence(german, english) == expected


def _split_texts(data: DataConfig) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for split in datasets.SPLITS:
        source = datasets.load_split(data, split)
        out[split] = [source[i] for i in range(len(source))]
    return out


def test_builder_splits_are_disjoint_and_sentence_only(ding_sample):
    splits = _split_texts(ding_sample)
    # Held out: the sentences whose SHA-256's first 8 bytes, as a fraction of 2^64,
    # fall below one fraction (test) or two (validation).
    fraction = ding.HELD_OUT_FRACTION
    for name, low, high in (("test", 0, fraction), ("validation", fraction, 2 * fraction)):
        for de, _ in splits[name]:
            u = int.from_bytes(hashlib.sha256(de.encode()).digest()[:8], "big") / 2**64
            assert low <= u < high, (name, de)
    assert len(splits["validation"]) >= 5 and len(splits["test"]) >= 5
    for de, en in splits["train"]:
        u = int.from_bytes(hashlib.sha256(de.encode()).digest()[:8], "big") / 2**64
        assert u >= 2 * fraction or not ding.is_sentence(de, en), de
    german = {name: {de for de, _ in pairs} for name, pairs in splits.items()}
    assert not german["train"] & german["validation"]
    assert not german["train"] & german["test"]
    assert not german["validation"] & german["test"]
    for name in ("validation", "test"):
        assert all(ding.is_sentence(de, en) for de, en in splits[name])
    # Phrases, with annotations gone and umlauts intact, are in train.
    assert ("Aalsuppe", "eel soup") in splits["train"]
    assert ("Straßen", "streets") in splits["train"]
    assert not any("{" in de or "[" in de or "<" in de for de, _ in splits["train"])


def test_builder_is_deterministic(ding_sample, tmp_path, capsys):
    again = ding_sample.replace(data_dir=str(tmp_path))
    datasets.prepare(again)
    first, second = _split_texts(ding_sample), _split_texts(again)
    for split in datasets.SPLITS:
        assert sorted(first[split]) == sorted(second[split])
    # The build reports each split it writes, ending with the whole count.
    out = capsys.readouterr().out
    for split in datasets.SPLITS:
        n = len(second[split])
        assert f"writing ding_de_en's {split} split: {n:,}/{n:,} pairs" in out, out


def test_an_unbuilt_dataset_leaves_no_temporary_folder(monkeypatch, tmp_path):
    # TFDS's DatasetInfo makes an empty mkdtemp("tfds") folder for every builder whose
    # data is not prepared yet; ours must not leave one per run in /tmp.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    builder = ding.DingDeEn(data_dir=str(tmp_path / "data"), file_format="array_record")
    assert not builder.is_prepared()
    assert list(scratch.iterdir()) == []


def test_direction_swaps_source_and_target(ding_sample):
    de_en = datasets.load_split(ding_sample, "test")[0]
    en_de = datasets.load_split(ding_sample.replace(direction="en-de"), "test")[0]
    assert en_de == (de_en[1], de_en[0])


@pytest.mark.parametrize("split", datasets.SPLITS)
def test_bulk_reads_equal_tfds_decoding(ding_sample, split):
    """chunks() parses the stored protos itself; every record, every field and its
    type must be what TFDS's own decoding gives."""
    source = datasets.load_split(ding_sample, split)
    assert datasets._scalar_parser(source.records) is not None  # the fast path is taken
    indices = list(range(len(source)))[::-1]  # any order, not only the stored one
    ours = [record for chunk in source.chunks(indices) for record in chunk]
    theirs = source.records.__getitems__(indices)
    assert ours == theirs
    assert [{k: type(v) for k, v in r.items()} for r in ours] == [
        {k: type(v) for k, v in r.items()} for r in theirs
    ]


def test_missing_corpus_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(ding, "SYSTEM_PATH", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="apt-get install trans-de-en"):
        ding.find_corpus(None)
    with pytest.raises(DataError, match="manual_dir"):
        ding.find_corpus(str(tmp_path))


def test_a_manual_dir_without_the_file_is_refused_not_ignored(tmp_path):
    # The builder would otherwise fall back to the system file and succeed.
    empty = tmp_path / "empty"
    empty.mkdir()
    for manual, message in [
        (tmp_path / "missing", "is not a folder"),
        (empty, "no Ding dictionary file"),
    ]:
        data = DataConfig(
            dataset="ding_de_en", direction="de-en", data_dir=str(tmp_path / "tfds"),
            manual_dir=str(manual),
        )  # fmt: skip
        with pytest.raises(DataError, match=message):
            datasets.prepare(data)
    assert not (tmp_path / "tfds" / "ding_de_en").exists()


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "de-en").write_text("# only a comment\nno pairs here\n")
    with pytest.raises(DataError, match="no dictionary lines"):
        ding.read_pairs(ding.find_corpus(str(tmp_path)))


@pytest.mark.skipif(not os.path.exists(ding.SYSTEM_PATH), reason="trans-de-en is not installed")
def test_real_corpus_split_sizes():
    # The builder's splits are split_pairs(read_pairs(file)); the TFDS build itself
    # is tested on the sample corpus (writing the 657k real pairs takes ~100 s).
    splits = ding.split_pairs(ding.read_pairs(ding.find_corpus(None)))
    sizes = {split: len(pairs) for split, pairs in splits.items()}
    assert 600_000 < sizes["train"] < 700_000, sizes
    assert 900 < sizes["validation"] < 1200, sizes
    assert 900 < sizes["test"] < 1200, sizes
    assert all(ding.is_sentence(de, en) for de, en, _ in splits["test"])
    german = {split: {de for de, _, _ in pairs} for split, pairs in splits.items()}
    assert not german["test"] & german["train"] and not german["validation"] & german["train"]
