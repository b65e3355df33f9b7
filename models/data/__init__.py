"""The papers' data: readers for the real formats, MTCNN face crops, multi-source merge
with task masks, batched augmentation, and a generator of synthetic datasets in the same
formats (for tests, and for trying the trainer without the real data)."""

from .augment import augment_batch, to_model_input
from .formats import SkipReport, SourceRecords, read_fer2013, read_genki4k, read_imdb_wiki, read_rafdb
from .merge import MultiTaskDataset, kfold_splits, merge_sources, split_by_fraction

__all__ = ["augment_batch", "to_model_input", "SkipReport", "SourceRecords", "read_fer2013", "read_genki4k",
           "read_imdb_wiki", "read_rafdb", "MultiTaskDataset", "kfold_splits", "merge_sources", "split_by_fraction"]
