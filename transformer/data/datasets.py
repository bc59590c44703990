"""One interface over the corpora: prepare once, then (source, target) text pairs by index.

TFDS builds every corpus into array_record files, which `tfds.data_source`
reads by random access without TensorFlow. Records hold bytes per language;
`TranslationSource` turns them into (source, target) strings in the
configured direction. Reads of many records at once (tokenizing a split, the
vocabulary's sample) parse the stored protos directly where every feature is
a scalar: TFDS's per-record decoding in Python costs 6x more than the read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources.array_record import ArrayRecordDataSource
from tensorflow_datasets.proto import tf_example_pb2

from transformer.config import DataConfig
from transformer.data import DataError, ding, quiet_tfds

SPLITS = ("train", "validation", "test")
READ_CHUNK = 20_000  # records per batched read


def _ding_builder(data: DataConfig) -> ding.DingDeEn:
    quiet_tfds()
    return ding.DingDeEn(data_dir=data.data_dir, file_format="array_record")


def prepare(data: DataConfig) -> None:
    """Builds the dataset's array_record files under data_dir unless they exist."""
    if data.dataset == "ding_de_en":
        builder = _ding_builder(data)
        if not builder.is_prepared():
            if data.manual_dir:  # the builder would fall back to the system file
                ding.find_corpus(data.manual_dir)
            print(f"building ding_de_en in {builder.data_dir} (once, about a minute)", flush=True)
            config = tfds.download.DownloadConfig(manual_dir=data.manual_dir)
            tfds.disable_progress_bar()  # a minute of bars redrawn in a log is noise
            try:
                builder.download_and_prepare(download_config=config)
            finally:
                tfds.enable_progress_bar()
    else:
        from transformer.data import wmt

        wmt.prepare_wmt(data.dataset, data.data_dir, data.manual_dir)


def _records(data: DataConfig, split: str):
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if data.dataset == "ding_de_en":
        builder = _ding_builder(data)
        if not builder.is_prepared():
            raise DataError(
                f"ding_de_en is not built in {builder.data_dir}; run training once or "
                "python -m experiments.prepare_data --dataset=ding_de_en"
            )
        return builder.as_data_source(split=split)
    from transformer.data import wmt

    return wmt.wmt_split(data.dataset, split, data.data_dir)


@dataclasses.dataclass
class TranslationSource:
    """Random access to (source text, target text) pairs of one split."""

    records: object  # a tfds/grain random-access data source
    source_lang: str
    target_lang: str

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[str, str]:
        with self._reading():
            record = self.records[index]
        return as_text(record[self.source_lang]), as_text(record[self.target_lang])

    def chunks(self, indices) -> Iterator[list[dict]]:
        """The records at `indices`, READ_CHUNK at a time: single reads cost ~25x more."""
        indices = [int(i) for i in indices]
        parse = _scalar_parser(self.records)
        for start in range(0, len(indices), READ_CHUNK):
            chunk = indices[start : start + READ_CHUNK]
            with self._reading():
                if parse is None:
                    records = self.records.__getitems__(chunk)
                else:
                    records = [parse(raw) for raw in self.records.data_source.__getitems__(chunk)]
            yield records

    @contextlib.contextmanager
    def _reading(self):
        """array_record's RuntimeError for a damaged file -> a DataError naming the folder."""
        try:
            yield
        except RuntimeError as e:
            info = getattr(self.records, "dataset_info", None)
            folder = info.data_dir if info is not None else "the dataset's folder"
            reason = str(e).split(" (")[0].split(";")[0][:160]
            raise DataError(
                f"a file of {folder} is damaged ({reason}); delete that folder and rerun: "
                "the dataset is built again"
            ) from e

    def texts(self, indices) -> list[tuple[str, str]]:
        """(source, target) texts of the examples at `indices`."""
        langs = (self.source_lang, self.target_lang)
        return [
            (as_text(r[langs[0]]), as_text(r[langs[1]]))
            for chunk in self.chunks(indices)
            for r in chunk
        ]


def _scalar_parser(records):
    """A function from a stored record's bytes to the dict TFDS would decode it to,
    for array_record sources whose features are all scalars (text, integers,
    booleans); None for any other source, which TFDS then decodes itself."""
    if not isinstance(records, ArrayRecordDataSource) or records.decoders:
        return None
    specs = records.dataset_info.features.get_serialized_info()
    if not isinstance(specs, dict) or any(spec.shape != () for spec in specs.values()):
        return None
    convert = {}
    for key, spec in specs.items():
        dtype = np.dtype(spec.np_dtype)
        if dtype == np.object_:  # text
            convert[key] = lambda feature: feature.bytes_list.value[0]
        elif dtype == np.bool_:
            convert[key] = lambda feature: bool(feature.int64_list.value[0])
        elif np.issubdtype(dtype, np.integer):
            convert[key] = lambda feature: int(feature.int64_list.value[0])
        else:
            return None

    def parse(raw: bytes) -> dict:
        features = tf_example_pb2.Example.FromString(raw).features.feature
        return {key: f(features[key]) for key, f in convert.items()}

    return parse


def as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_split(data: DataConfig, split: str) -> TranslationSource:
    """The split of a prepared dataset as (source, target) pairs in data.direction."""
    source_lang, target_lang = data.languages()
    return TranslationSource(_records(data, split), source_lang, target_lang)
