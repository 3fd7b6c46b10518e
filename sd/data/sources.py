"""The kinds of listed files training reads, chosen by file name: PaddleMIX's part files (plain or ``.gz``; any
name not below) and img2dataset's shards, a webdataset ``.tar`` or a ``.parquet`` with the image bytes in a
column (sd/data/img2dataset.py). The record stream (sd/data/record_stream.py) reads whichever table it is given.
"""

from sd.data import img2dataset
from sd.data.record_stream import PART_FILES, RecordSource, choose_source

IMG2DATASET_TAR = RecordSource("img2dataset tar shard", (".tar",), img2dataset.iter_tar, img2dataset.decode_sample)
IMG2DATASET_PARQUET = RecordSource("img2dataset parquet shard", (".parquet",), img2dataset.iter_parquet,
                                   img2dataset.decode_sample)
SOURCES = (PART_FILES, IMG2DATASET_TAR, IMG2DATASET_PARQUET)


def source_for(path: str) -> RecordSource:
    """The source that reads ``path``: by its suffix, else part files."""
    return choose_source(path, SOURCES)
