"""How to read each dataset once located (see :mod:`.locate`: the data root itself or one
folder down, or ``--dataset NAME=PATH``), and the layout the ``synth`` command writes:

    DATA_ROOT/genki4k/   files/, labels.txt
    DATA_ROOT/fer2013/   fer2013.csv
    DATA_ROOT/wiki/      wiki_crop/wiki.mat, wiki_crop/NN/*.jpg
    DATA_ROOT/imdb/      imdb_crop/imdb.mat, imdb_crop/NN/*.jpg
    DATA_ROOT/rafdb/     EmoLabel/, Image/aligned/, Annotation/manual/
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from . import synthetic
from .formats import read_fer2013, read_genki4k, read_imdb_wiki, read_rafdb
from .locate import locate

# Each reader takes (root, fold): GENKI-4K and IMDB-WIKI have no official test set and are
# split per cross-validation fold; FER-2013 (Kaggle's public / private test) and RAF-DB keep
# their official splits in every fold.
READERS = {
    "genki4k": lambda root, fold: read_genki4k(root, fold=fold),
    "fer2013": lambda root, fold: read_fer2013(root),
    "wiki": lambda root, fold: read_imdb_wiki(root, "wiki", fold=fold),
    "imdb": lambda root, fold: read_imdb_wiki(root, "imdb", fold=fold),
    "rafdb": lambda root, fold: read_rafdb(root),
}
FOLDS = 4  # paper 1: 4-fold cross-validation
WRITERS = {
    "genki4k": synthetic.write_genki4k,
    "fer2013": synthetic.write_fer2013,
    "wiki": lambda root: synthetic.write_imdb_wiki(root, "wiki"),
    "imdb": lambda root: synthetic.write_imdb_wiki(root, "imdb"),
    "rafdb": synthetic.write_rafdb,
}


def read_source(name: str, data_root=None, fold: int = 1, overrides: Optional[Mapping[str, Path]] = None):
    """Dataset ``name``, found under ``data_root`` (or at ``overrides[name]``), with the train /
    test split of cross-validation fold ``fold`` (1-4)."""
    if name not in READERS:
        raise ValueError(f"source must be one of {sorted(READERS)}, got {name!r}")
    if not 1 <= fold <= FOLDS:
        raise ValueError(f"fold must be in 1..{FOLDS}, got {fold}")
    return READERS[name](locate(name, data_root, overrides).folder, fold - 1)


def write_synthetic(name: str, data_root) -> Path:
    if name not in WRITERS:
        raise ValueError(f"source must be one of {sorted(WRITERS)}, got {name!r}")
    return WRITERS[name](Path(data_root) / name)
