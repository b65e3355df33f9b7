"""Where each dataset lives under one data root, and how to read it: the layout the
``synth`` command writes and the ``prepare`` command (and the trainer) reads.

    DATA_ROOT/genki4k/   files/, labels.txt
    DATA_ROOT/fer2013/   fer2013.csv
    DATA_ROOT/wiki/      wiki_crop/wiki.mat, wiki_crop/NN/*.jpg
    DATA_ROOT/imdb/      imdb_crop/imdb.mat, imdb_crop/NN/*.jpg
    DATA_ROOT/rafdb/     EmoLabel/, Image/aligned/, Annotation/manual/
"""

from __future__ import annotations

from pathlib import Path

from . import synthetic
from .formats import read_fer2013, read_genki4k, read_imdb_wiki, read_rafdb

READERS = {
    "genki4k": read_genki4k,
    "fer2013": read_fer2013,
    "wiki": lambda root: read_imdb_wiki(root, "wiki"),
    "imdb": lambda root: read_imdb_wiki(root, "imdb"),
    "rafdb": read_rafdb,
}
WRITERS = {
    "genki4k": synthetic.write_genki4k,
    "fer2013": synthetic.write_fer2013,
    "wiki": lambda root: synthetic.write_imdb_wiki(root, "wiki"),
    "imdb": lambda root: synthetic.write_imdb_wiki(root, "imdb"),
    "rafdb": synthetic.write_rafdb,
}


def read_source(name: str, data_root):
    if name not in READERS:
        raise ValueError(f"source must be one of {sorted(READERS)}, got {name!r}")
    return READERS[name](Path(data_root) / name)


def write_synthetic(name: str, data_root) -> Path:
    if name not in WRITERS:
        raise ValueError(f"source must be one of {sorted(WRITERS)}, got {name!r}")
    return WRITERS[name](Path(data_root) / name)
