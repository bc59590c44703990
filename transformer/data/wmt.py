"""WMT through TFDS without TensorFlow: wmt14_translate/de-en, /fr-en, wmt17_translate/de-en.

TFDS's own builders (tensorflow_datasets.translate.wmt14 and wmt17) know
which statmt.org archives make up each split and how to parse them. Without
TensorFlow they are registered only once their modules are imported; this
module imports them and uses the classes directly. They write array_record
files, which `as_data_source` reads by random access; a record holds UTF-8
bytes per language code ({"de": b"...", "en": b"..."}).

Archives. `required_archives` lists (file name, URL) from the builder's own
subset definitions, filtered to the language pair as the builder filters
them, named as TFDS registered each URL. TFDS's DownloadManager takes an
archive from the manual_dir when a file of exactly that name is there
(default <data_dir>/downloads/manual) and verifies its size and sha256
against its registry; else it takes the copy in its download cache
(<data_dir>/downloads); else it downloads.

Failing fast. Where there is no internet TFDS would retry each download for
minutes and then fail without saying what to do. So `prepare_wmt` first finds
the archives that are neither in the manual_dir nor in the cache. If any are
missing and downloads are off (`download=False`), or a TCP connection to
their host cannot be opened within CONNECT_TIMEOUT_S, it raises one DataError
listing the missing files with their URLs and the folder to put them in. No
other step touches the network (`try_download_gcs` is off: the prepared
copies there are TFRecord, unreadable without TensorFlow). An archive whose
checksum differs from TFDS's registry is a DataError too.

Extraction. TFDS's extractor writes through tf.io.gfile and fails without
TensorFlow, but its DownloadManager reuses an existing extraction. So
`prepare_wmt` gets the archives (the same DownloadManager calls, so the same
places and checks) and extracts them itself, with the member filter and
folder names TFDS uses, before the builder runs.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import tarfile
import urllib.parse
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import constants
from tensorflow_datasets.core.download import checksums, download_manager, resource
from tensorflow_datasets.translate import wmt as tfds_wmt
from tensorflow_datasets.translate import wmt14, wmt17

from transformer.config import DATASETS
from transformer.data import DataError, quiet_tfds

WMT_DATASETS = tuple(name for name in DATASETS if name.startswith("wmt"))
BUILDERS = {"wmt14_translate": wmt14.Wmt14Translate, "wmt17_translate": wmt17.Wmt17Translate}
SPLITS = ("train", "validation", "test")
CONNECT_TIMEOUT_S = 5.0  # per host; long enough for a slow link, short next to TFDS's retries
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}
_COPY_CHUNK = 1 << 24  # bytes per read when extracting


class Archive(NamedTuple):
    """One file a dataset is built from: its name in the manual_dir and where to get it."""

    filename: str
    url: str


def wmt_builder(dataset: str, data_dir: str | None) -> tfds_wmt.WmtTranslate:
    """The TFDS builder of `dataset` ("wmt14_translate/de-en", ...) writing array_record."""
    if dataset not in WMT_DATASETS:
        raise DataError(f"unknown WMT dataset {dataset!r}; choose one of {', '.join(WMT_DATASETS)}")
    name, _, pair = dataset.partition("/")
    quiet_tfds()
    with _no_bucket_lookup():
        return BUILDERS[name](config=pair, data_dir=data_dir, file_format="array_record")


@contextlib.contextmanager
def _no_bucket_lookup():
    """TFDS runs DatasetInfo.initialize_from_bucket for every builder whose data
    is not prepared yet; it makes an empty tempfile.mkdtemp("tfds") folder that
    is never removed, before a GCS lookup that is off (`try_download_gcs`
    aside, TFDS disables GCS by default). ding.py's own builder overrides it;
    TFDS's WMT builders are used as they are, so it is a no-op while one is made.
    """
    info = tfds.core.DatasetInfo
    saved = info.initialize_from_bucket
    info.initialize_from_bucket = lambda self: None
    try:
        yield
    finally:
        info.initialize_from_bucket = saved


# ----------------------------------------------------------------------------
# Which archives, and which of them are missing.
# ----------------------------------------------------------------------------


def _registry(builder: tfds_wmt.WmtTranslate) -> dict[str, checksums.UrlInfo]:
    """URL -> (size, sha256, file name), merged as the DownloadManager merges it."""
    infos = dict(checksums.get_all_url_infos())  # a copy: TFDS memoizes that dict
    infos.update(type(builder).url_infos or {})
    return infos


def _archives(builder: tfds_wmt.WmtTranslate, split: str | None) -> list[Archive]:
    source = builder.builder_config.language_pair[0]
    urls = []
    for split_name, subset_names in builder.subsets.items():
        if split in (None, split_name):
            for subset in subset_names:
                urls += tfds_wmt.DATASET_MAP[subset].get_url(source)
    registry = _registry(builder)
    archives = []
    for url in dict.fromkeys(urls):  # dev.tgz serves both validation and test
        info = registry.get(url)
        # TFDS matches manual files by the registered name; unregistered URLs
        # are never taken from the manual_dir, their basename is only a hint.
        name = info.filename if info and info.filename else os.path.basename(url)
        archives.append(Archive(name, url))
    return archives


def required_archives(dataset: str, split: str | None = None) -> list[Archive]:
    """(file name, URL) of every archive `dataset` is built from, or only `split`'s.

    Derived from the TFDS builder's subsets for the dataset's language pair,
    in its order, each URL once.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return _archives(wmt_builder(dataset, None), split)


def _download_dir(builder: tfds_wmt.WmtTranslate) -> epath.Path:
    return builder.data_dir_root / "downloads"  # download_and_prepare's default


def manual_dir_of(builder: tfds_wmt.WmtTranslate, manual_dir: str | None) -> epath.Path:
    """The folder TFDS takes archives from: manual_dir, else <data_dir>/downloads/manual."""
    return epath.Path(manual_dir) if manual_dir else _download_dir(builder) / "manual"


def _is_cached(builder: tfds_wmt.WmtTranslate, url: str, info: checksums.UrlInfo | None) -> bool:
    """Whether an earlier run downloaded `url` into the cache, under TFDS's naming.

    The DownloadManager names a file after its URL and its sha256 when known,
    in a folder per dataset (or, in older versions, directly in downloads/).
    """
    name = resource.get_dl_fname(url, info.checksum if info else None)
    root = _download_dir(builder)
    return any(resource.is_locally_cached(folder / name) for folder in (root / builder.name, root))


def _missing(builder: tfds_wmt.WmtTranslate, manual_dir: str | None) -> list[Archive]:
    folder = manual_dir_of(builder, manual_dir)
    registry = _registry(builder)
    return [
        archive
        for archive in _archives(builder, None)
        if not (folder / archive.filename).exists()
        and not _is_cached(builder, archive.url, registry.get(archive.url))
    ]


# ----------------------------------------------------------------------------
# Fail fast where the archives cannot be downloaded.
# ----------------------------------------------------------------------------


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 80)


def _unreachable(urls: list[str]) -> str | None:
    """The first host:port of `urls` that takes no TCP connection quickly, else None."""
    for host, port in dict.fromkeys(_host_port(url) for url in urls):
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError:  # no DNS, no route, refused or timed out: all mean "offline"
            return f"{host}:{port}"
    return None


def _check_downloadable(
    builder: tfds_wmt.WmtTranslate, missing: list[Archive], manual_dir: str | None, download: bool
) -> None:
    """Raises DataError naming the missing archives unless they can be downloaded now."""
    unreachable = _unreachable([a.url for a in missing]) if download else None
    if download and unreachable is None:
        logging.info("Downloading %s", ", ".join(a.filename for a in missing))
        return
    reason = "downloads are off" if not download else f"{unreachable} cannot be reached"
    folder = manual_dir_of(builder, manual_dir)
    listing = "; ".join(f"{a.filename} from {a.url}" for a in missing)
    where = f"{folder} (the --manual_dir)" if manual_dir else f"{folder} or a --manual_dir"
    raise DataError(
        f"{builder.name}/{builder.builder_config.name} needs {len(missing)} archive(s) that are "
        f"not in {folder} and {reason}: {listing}. Download them and put them, with these "
        f"file names, in {where}"
    )


# ----------------------------------------------------------------------------
# Getting and extracting the archives: TFDS's extractor needs TensorFlow.
# ----------------------------------------------------------------------------


def _fetch(builder: tfds_wmt.WmtTranslate, manual_dir: str | None) -> list[epath.Path]:
    """Local paths of all archives: from the manual_dir, the cache, or downloaded now.

    A DownloadManager set up as download_and_prepare sets up its own, so
    that the builder finds each archive where this one left it. One URL at a
    time: www.statmt.org answers parallel downloads with 503.
    """
    manager = tfds.download.DownloadManager(
        download_dir=_download_dir(builder),
        manual_dir=manual_dir_of(builder, manual_dir),
        url_infos=type(builder).url_infos,
        dataset_name=builder.name,
    )
    return [manager.download(archive.url) for archive in _archives(builder, None)]


def _member_path(name: str) -> str | None:
    """A tar member's path as TFDS's extractor keeps it; None for what it skips."""
    path = os.path.normpath(name)
    hidden = path.startswith(".") or os.path.basename(path).startswith(".")
    return None if hidden or os.path.isabs(path) or path.endswith("~") else path


def _extract_tar(archive: epath.Path, folder: epath.Path) -> None:
    # Streamed member by member through epath, so gs:// data_dirs work too.
    folder.mkdir(parents=True)
    with archive.open("rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            path = _member_path(member.name) if member.isfile() else None
            if path is None:
                continue
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink, _COPY_CHUNK)


def _extract_gzip(archive: epath.Path, file: epath.Path) -> None:
    with archive.open("rb") as stream, gzip.open(stream) as source, file.open("wb") as sink:
        shutil.copyfileobj(source, sink, _COPY_CHUNK)


_EXTRACTORS = {
    resource.ExtractMethod.TAR: _extract_tar,
    resource.ExtractMethod.TAR_GZ: _extract_tar,
    resource.ExtractMethod.TAR_STREAM: _extract_tar,
    resource.ExtractMethod.TAR_GZ_STREAM: _extract_tar,
    resource.ExtractMethod.GZIP: _extract_gzip,
}


def _extract(archive: epath.Path, extract_dir: epath.Path) -> None:
    """Extracts like TFDS would, into the path where TFDS then reuses the extraction.

    TFDS's extractor writes through tf.io.gfile, so it fails without
    TensorFlow; but the DownloadManager skips extraction when
    <extract_dir>/<METHOD>.<archive file name> exists. The extraction goes to a
    temporary name first, so an interrupted one is never taken as complete.
    """
    method = resource.Resource(path=archive).extract_method  # from the name, as TFDS guesses it
    if method == resource.ExtractMethod.NO_EXTRACT:
        return
    target = extract_dir / f"{method.name}.{archive.name}"
    if target.exists():
        return
    if method not in _EXTRACTORS:
        raise DataError(f"cannot extract {archive} ({method.name}) without TensorFlow")
    partial = extract_dir / f"{constants.INCOMPLETE_PREFIX}{uuid.uuid4().hex}.{target.name}"
    extract_dir.mkdir(parents=True, exist_ok=True)
    _EXTRACTORS[method](archive, partial)
    partial.rename(target)


def _checksum_error(error: Exception) -> DataError:
    first_line = str(error).splitlines()[0].rstrip(":")
    return DataError(
        f"{first_line} (size or sha256 differ from TFDS's registry): replace the file with a "
        "fresh download from that URL"
    )


def prepare_wmt(
    dataset: str, data_dir: str | None, manual_dir: str | None, *, download: bool = True
) -> None:
    """Builds `dataset`'s array_record files under data_dir unless they exist.

    Archives come from manual_dir (by file name, checksum verified), the
    download cache, or statmt.org; `download=False` forbids the last. Raises
    DataError, before any download is attempted, when some cannot be had.
    """
    builder = wmt_builder(dataset, data_dir)
    if builder.is_prepared():
        return
    missing = _missing(builder, manual_dir)
    if missing:
        _check_downloadable(builder, missing, manual_dir, download)
    try:
        archives = _fetch(builder, manual_dir)
    except download_manager.NonMatchingChecksumError as error:
        raise _checksum_error(error) from error
    for archive in archives:
        _extract(archive, _download_dir(builder) / "extracted")
    # The builder finds every archive where _fetch left it (and checks it again).
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    builder.download_and_prepare(download_config=config)


def wmt_split(dataset: str, split: str, data_dir: str | None) -> Sequence[dict[str, bytes]]:
    """Random access to the records of one split of a prepared WMT dataset.

    Each record is {language code: UTF-8 bytes}, e.g. {"de": b"...", "en": b"..."}.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    builder = wmt_builder(dataset, data_dir)
    if not builder.is_prepared():
        raise DataError(
            f"{dataset} is not built in {builder.data_dir}; run training once with "
            f"--dataset={dataset} to build it (with --manual_dir holding its archives where "
            "there is no internet)"
        )
    return builder.as_data_source(split=split)
