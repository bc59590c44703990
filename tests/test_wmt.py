"""The WMT builders through transformer.data.wmt: archive lists, failing fast, building offline.

No test reaches the network: a guard replaces socket connections for the
whole module and records every attempt. The build tests use small archives
made here with the real file names and inner layout, put in a manual_dir.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile

import pytest
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.download import checksums, resource
from tensorflow_datasets.translate import wmt14

from transformer.config import DataConfig
from transformer.data import DataError, datasets, wmt

DE_EN = "wmt14_translate/de-en"
REAL_CHECKSUMS = dict(wmt14.Wmt14Translate.url_infos)  # TFDS's, read before any test patches them
STATMT = ("http://www.statmt.org/", "http://data.statmt.org/")


# ----------------------------------------------------------------------------
# No network: every connection attempt is recorded and fails as if offline.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def connections():
    """The (host, port) of each attempted connection; each fails with OSError."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family == socket.AF_UNIX:  # local IPC is not the network
            return real_connect(sock, address)
        attempts.append(tuple(address[:2]))
        raise OSError("network disabled in tests")

    def getaddrinfo(host, port, *args, **kwargs):
        attempts.append((host, port))
        raise socket.gaierror("network disabled in tests")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts


@pytest.fixture
def no_new_connections(connections):
    """Fails the test if it attempted any connection."""
    before = len(connections)
    yield
    assert connections[before:] == []


# ----------------------------------------------------------------------------
# Which archives.
# ----------------------------------------------------------------------------

EXPECTED_ARCHIVES = {
    "wmt14_translate/de-en": [
        "training-parallel-europarl-v7.tgz",
        "training-parallel-commoncrawl.tgz",
        "training-parallel-nc-v9.tgz",
        "dev.tgz",
    ],
    "wmt14_translate/fr-en": [
        "training-parallel-europarl-v7.tgz",
        "training-parallel-commoncrawl.tgz",
        "training-parallel-un.tgz",
        "training-parallel-nc-v9.tgz",
        "training-giga-fren.tar",
        "dev.tgz",
    ],
    "wmt17_translate/de-en": [
        "training-parallel-europarl-v7.tgz",
        "training-parallel-commoncrawl.tgz",
        "training-parallel-nc-v12.tgz",
        "rapid2016.tgz",
        "dev.tgz",
    ],
}


@pytest.mark.parametrize("dataset", list(EXPECTED_ARCHIVES))
def test_required_archives_per_dataset(dataset, no_new_connections):
    archives = wmt.required_archives(dataset)
    assert [name for name, _ in archives] == EXPECTED_ARCHIVES[dataset]
    for name, url in archives:
        assert url.startswith(STATMT) and url.endswith("/" + name)


def test_making_a_builder_leaves_no_folder_in_the_temp_dir(tmp_path, monkeypatch):
    """TFDS's DatasetInfo.initialize_from_bucket makes an empty "tfds" temp folder
    for every builder of unprepared data and never removes it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    builder = wmt.wmt_builder(DE_EN, str(tmp_path / "data"))
    assert builder.info.full_name.startswith("wmt14_translate/de-en")
    assert os.listdir(scratch) == []
    # TFDS's own method is back in place for any other builder.
    tfds.core.DatasetInfo.initialize_from_bucket(builder.info)
    assert [name for name in os.listdir(scratch) if name.endswith("tfds")]


def test_required_archives_by_split():
    train = wmt.required_archives(DE_EN, "train")
    assert ("dev.tgz", "http://data.statmt.org/wmt19/translation-task/dev.tgz") not in train
    assert (
        "training-parallel-europarl-v7.tgz",
        "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz",
    ) in train
    # newstest2013 (validation) and newstest2014 (test) both come from dev.tgz.
    for split in ("validation", "test"):
        assert [a.filename for a in wmt.required_archives(DE_EN, split)] == ["dev.tgz"]


def test_unknown_dataset_or_split_is_a_data_error():
    with pytest.raises(DataError, match="choose one of wmt14_translate/de-en"):
        wmt.required_archives("wmt14_translate/cs-en")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        wmt.required_archives(DE_EN, "dev")


# ----------------------------------------------------------------------------
# Failing fast when archives are missing.
# ----------------------------------------------------------------------------


def _assert_lists(message: str, archives) -> None:
    for name, url in archives:
        assert f"{name} from {url}" in message


def test_missing_archives_fail_at_once_without_download(tmp_path, no_new_connections, caplog):
    manual = tmp_path / "manual"
    manual.mkdir()
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError) as error:
        wmt.prepare_wmt(DE_EN, str(data_dir), str(manual), download=False)
    # The error is all a user sees: no TFDS warning about the folder not built yet.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    message = str(error.value)
    assert "\n" not in message
    assert "needs 4 archive(s)" in message and "downloads are off" in message
    assert "--manual_dir" in message and str(manual) in message
    _assert_lists(message, wmt.required_archives(DE_EN))
    assert not (data_dir / "wmt14_translate" / "de-en").exists()  # nothing half-built


def test_only_the_missing_archives_are_listed(tmp_path, no_new_connections):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "training-parallel-europarl-v7.tgz").write_bytes(b"")  # present by name
    (manual / "dev.tgz").write_bytes(b"")
    with pytest.raises(DataError, match="needs 2 archive") as error:
        wmt.prepare_wmt(DE_EN, str(tmp_path / "tfds"), str(manual), download=False)
    message = str(error.value)
    assert "training-parallel-commoncrawl.tgz from" in message
    assert "training-parallel-nc-v9.tgz from" in message
    assert "europarl" not in message and "dev.tgz" not in message


def test_without_manual_dir_the_default_folder_is_named(tmp_path, no_new_connections):
    with pytest.raises(DataError) as error:
        wmt.prepare_wmt(DE_EN, str(tmp_path), None, download=False)
    assert f"in {tmp_path}/downloads/manual or a --manual_dir" in str(error.value)


def test_offline_machine_fails_after_one_probe(tmp_path, connections):
    """With downloads allowed, one failed connection to statmt.org is enough to stop."""
    before = len(connections)
    with pytest.raises(DataError, match=r"www\.statmt\.org:80 cannot be reached") as error:
        wmt.prepare_wmt(DE_EN, str(tmp_path), str(tmp_path), download=True)
    assert connections[before:] == [("www.statmt.org", 80)]
    _assert_lists(str(error.value), wmt.required_archives(DE_EN))


def test_unbuilt_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="is not built in .*--manual_dir"):
        wmt.wmt_split(DE_EN, "train", str(tmp_path))


# ----------------------------------------------------------------------------
# Building from a manual_dir of small archives in the real layout.
# ----------------------------------------------------------------------------

# Parallel text per subset, in file order: (German, English).
EUROPARL = [
    ("Wiederaufnahme der Sitzungsperiode", "Resumption of the session"),
    (
        "Ich bitte Sie, sich zu einer Schweigeminute zu erheben.",
        "Please rise for a minute's silence.",
    ),
]
COMMONCRAWL = [
    ("Das Haus ist grün.", "The house is green."),
    ("Straßen und Türen", "Streets and doors"),
]
NEWS_COMMENTARY = [("Gold für 10.000 Dollar?", "$10,000 Gold?")]
NEWSTEST2013 = [
    ("Eine republikanische Strategie", "A Republican strategy"),
    ("Die Wahlen kommen näher.", "The elections are coming."),
]
NEWSTEST2014 = [
    ("Gutach: Noch mehr Sicherheit für Fußgänger", "Gutach: Increased safety for pedestrians"),
    ("Sie stehen keine 100 Meter voneinander entfernt.", "They are not even 100 metres apart."),
]


def _lines(texts: list[str]) -> bytes:
    return ("\n".join(texts) + "\n").encode("utf-8")


def _sgm(texts: list[str], lang: str) -> bytes:
    """newstest in SGML, as in dev.tgz: one <seg> per line inside <doc>."""
    segs = [f'<seg id="{i}">{text}</seg>' for i, text in enumerate(texts, 1)]
    lines = [
        f'<srcset setid="newstest2014" srclang="any" trglang="{lang}">',
        '<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">',
        "<p>",
        *segs,
        "</p>",
        "</doc>",
        "</srcset>",
    ]
    return "\n".join(lines).encode("utf-8")


def _tgz(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _pair_files(prefix: str, pairs) -> dict[str, bytes]:
    return {
        f"{prefix}.de": _lines([de for de, _ in pairs]),
        f"{prefix}.en": _lines([en for _, en in pairs]),
    }


def make_wmt14_de_en_archives(folder) -> None:
    """The four archives of wmt14_translate/de-en, tiny, with the real names and paths."""
    decoy = {
        "training/europarl-v7.fr-en.fr": _lines(["Reprise de la session"]),  # another pair
        "../outside.txt": b"must not be written outside the extraction folder",
    }
    _tgz(
        folder / "training-parallel-europarl-v7.tgz",
        _pair_files("training/europarl-v7.de-en", EUROPARL) | decoy,
    )
    _tgz(
        folder / "training-parallel-commoncrawl.tgz", _pair_files("commoncrawl.de-en", COMMONCRAWL)
    )
    _tgz(
        folder / "training-parallel-nc-v9.tgz",
        _pair_files("training/news-commentary-v9.de-en", NEWS_COMMENTARY),
    )
    dev = _pair_files("dev/newstest2013", NEWSTEST2013) | {
        "dev/newstest2014-deen-src.de.sgm": _sgm([de for de, _ in NEWSTEST2014], "de"),
        "dev/newstest2014-deen-ref.en.sgm": _sgm([en for _, en in NEWSTEST2014], "en"),
    }
    _tgz(folder / "dev.tgz", dev)


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wmt_manual")
    make_wmt14_de_en_archives(folder)
    return folder


@pytest.fixture(scope="module")
def test_checksums(manual_dir):
    """TFDS's checksum registry for wmt14_translate, with the test archives' sha256.

    TFDS verifies every archive it takes from a manual_dir against the size and
    sha256 it registered for the URL; small test archives cannot match. The
    builder's `url_infos` is where a TFDS builder registers its archives (the
    DownloadManager receives it and lets it override the global registry), so
    the test registers its own archives there, for these tests only.
    `register_checksums=True` is no way out: it rewrites the checksums file
    inside the installed tensorflow_datasets package.
    """
    infos = {}
    for name, url in wmt.required_archives(DE_EN):
        infos[url] = checksums.compute_url_info(manual_dir / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wmt14.Wmt14Translate, "url_infos", infos)
        yield infos
    # The DownloadManager merges a builder's url_infos into TFDS's memoized
    # global registry; put the real entries back for whatever runs next.
    checksums.get_all_url_infos().update(REAL_CHECKSUMS)


@pytest.fixture(scope="module")
def built(tmp_path_factory, manual_dir, test_checksums, connections):
    """A data_dir where wmt14_translate/de-en was built from the manual_dir, offline."""
    data_dir = tmp_path_factory.mktemp("wmt_tfds")
    before = len(connections)
    wmt.prepare_wmt(DE_EN, str(data_dir), str(manual_dir), download=False)
    assert connections[before:] == []
    return data_dir


def _pairs(source) -> list[tuple[str, str]]:
    return [(record["de"].decode(), record["en"].decode()) for record in source]


def test_splits_hold_the_archives_text(built):
    train = wmt.wmt_split(DE_EN, "train", str(built))
    assert sorted(_pairs(train)) == sorted(EUROPARL + COMMONCRAWL + NEWS_COMMENTARY)
    assert sorted(_pairs(wmt.wmt_split(DE_EN, "validation", str(built)))) == sorted(NEWSTEST2013)
    assert sorted(_pairs(wmt.wmt_split(DE_EN, "test", str(built)))) == sorted(NEWSTEST2014)
    extracted = built / "downloads" / "extracted"
    assert (extracted / "TAR_GZ.dev.tgz" / "dev" / "newstest2013.de").exists()
    assert not (extracted / "outside.txt").exists()


def test_load_split_gives_the_papers_direction(built, manual_dir):
    data = DataConfig(
        dataset=DE_EN, direction="en-de", data_dir=str(built), manual_dir=str(manual_dir)
    )
    datasets.prepare(data)  # already built: nothing to do, nothing downloaded
    test = datasets.load_split(data, "test")
    assert sorted(test[i] for i in range(len(test))) == sorted((en, de) for de, en in NEWSTEST2014)
    train = datasets.load_split(data, "train")
    assert ("The house is green.", "Das Haus ist grün.") in [train[i] for i in range(len(train))]


def test_bulk_reads_equal_tfds_decoding(built):
    source = datasets.load_split(
        DataConfig(dataset=DE_EN, direction="de-en", data_dir=str(built)), "train"
    )
    assert datasets._scalar_parser(source.records) is not None
    indices = [4, 0, 2, 2, 1, 3]
    assert [r for chunk in source.chunks(indices) for r in chunk] == source.records.__getitems__(
        indices
    )


def test_prepared_dataset_needs_no_archives(built, tmp_path, no_new_connections):
    wmt.prepare_wmt(DE_EN, str(built), str(tmp_path), download=False)  # empty manual_dir
    assert len(wmt.wmt_split(DE_EN, "train", str(built))) == 5


def test_archives_in_the_download_cache_are_used(
    manual_dir, test_checksums, tmp_path, no_new_connections
):
    """An earlier run's downloads count as present, and the builder takes them.

    TFDS's cache: <data_dir>/downloads/<dataset>/<name from URL and sha256>, with an INFO file.
    """
    cache = tmp_path / "downloads" / "wmt14_translate"
    cache.mkdir(parents=True)
    for name, url in wmt.required_archives(DE_EN):
        info = test_checksums[url]
        path = epath.Path(cache / resource.get_dl_fname(url, info.checksum))
        shutil.copy(manual_dir / name, path)
        resource.write_info_file(url, path, "wmt14_translate", name, info)
    wmt.prepare_wmt(DE_EN, str(tmp_path), None, download=False)
    assert sorted(_pairs(wmt.wmt_split(DE_EN, "test", str(tmp_path)))) == sorted(NEWSTEST2014)


def test_archive_with_a_foreign_checksum_is_a_data_error(manual_dir, tmp_path, no_new_connections):
    """Against TFDS's real checksums the small archives are rejected, before any download."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wmt14.Wmt14Translate, "url_infos", REAL_CHECKSUMS)
        with pytest.raises(DataError, match="sha256 differ from TFDS's registry"):
            wmt.prepare_wmt(DE_EN, str(tmp_path), str(manual_dir), download=False)


def test_a_gs_path_without_gcsfs_is_one_line(tmp_path):
    """gs:// data_dirs and workdirs reach GCS through gcsfs, in the [tpu] and [cuda]
    extras only. A `gcsfs` that fails to import, as fsspec reports a missing one,
    makes the test independent of what is installed (and keeps it offline)."""
    import subprocess
    import sys

    (tmp_path / "gcsfs.py").write_text(
        'raise ImportError("Please install gcsfs to access Google Storage")\n'
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.prepare_data", "--data_dir=gs://bucket/tfds"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]  # once: 74 lines
    assert lines[0] == (
        "experiments.prepare_data: error: a gs:// path needs gcsfs: pip install gcsfs "
        "(the [tpu] and [cuda] extras do)"
    )
