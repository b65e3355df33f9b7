"""Datasets found where users extract them: every distribution and layout read with the same
records as this project's canonical one, --dataset overriding the search, and the
`datasets` command's report."""

import hashlib
import shutil

import numpy as np
import pytest

from models.__main__ import main
from models.data import synthetic
from models.data.locate import DatasetNotFound, locate
from models.data.sources import read_source


def file_digests(records):
    return [hashlib.sha1(p.read_bytes()).hexdigest() for p in records.paths]


def assert_same_file_records(got, want):
    assert len(got) > 0 and len(got) == len(want)
    assert {t: v.tolist() for t, v in got.labels.items()} == {t: v.tolist() for t, v in want.labels.items()}
    assert got.split.tolist() == want.split.tolist()
    assert file_digests(got) == file_digests(want)
    assert got.report.counts() == want.report.counts()


def test_genki4k_archive_and_subset_folder(tmp_path):
    canonical = read_source("genki4k", synthetic.write_genki4k(tmp_path / "canonical" / "genki4k").parent)
    archive = tmp_path / "extracted" / "GENKI-R2009a"
    synthetic.write_genki4k(archive, layout="archive")
    located = locate("genki4k", tmp_path / "extracted")
    assert located.folder == archive and located.distribution.name == "GENKI-R2009a archive"
    assert_same_file_records(read_source("genki4k", tmp_path / "extracted"), canonical)
    # The archive's images may sit in its top-level files/ instead.
    shutil.move(archive / "Subsets" / "GENKI-4K" / "files", archive / "files")
    assert_same_file_records(read_source("genki4k", tmp_path / "extracted"), canonical)
    # Pointed at the subset folder itself: its labels and image list, the archive's files/.
    subset = read_source("genki4k", overrides={"genki4k": archive / "Subsets" / "GENKI-4K"})
    assert_same_file_records(subset, canonical)


def fer_rows(records):
    """(split with public/private merged into test, label, pixels) as a sorted list."""
    merged = ["train" if s == "train" else "test" for s in records.split]
    return sorted(zip(merged, records.labels["emotion"].tolist(), (p.tobytes() for p in records.pixels)))


def test_fer2013_image_folders(tmp_path):
    csv = read_source("fer2013", synthetic.write_fer2013(tmp_path / "csv" / "fer2013", n=40, bad_rows=2).parent)
    synthetic.write_fer2013(tmp_path / "folders" / "FER-2013", n=40, bad_rows=2, layout="folders")
    folders = read_source("fer2013", tmp_path / "folders")
    assert set(csv.split) == {"train", "public_test", "private_test"} and set(folders.split) == {"train", "test"}
    assert len(folders) == len(csv) == 38 and fer_rows(folders) == fer_rows(csv)
    assert folders.report.counts() == {"unreadable image": 2} and csv.report.counts() == {"bad pixels": 2}
    assert folders.pixels.shape == (38, 48, 48) and folders.pixels.dtype == np.uint8


@pytest.mark.parametrize("which", ["wiki", "imdb"])
def test_imdb_wiki_crop_folders(tmp_path, which):
    canonical = read_source(which, synthetic.write_imdb_wiki(tmp_path / "canonical" / which, which).parent)
    synthetic.write_imdb_wiki(tmp_path / "extracted", which)  # DATA_ROOT/{which}_crop/
    assert_same_file_records(read_source(which, tmp_path / "extracted"), canonical)
    crop_folder = tmp_path / "extracted" / f"{which}_crop"
    assert_same_file_records(read_source(which, overrides={which: crop_folder}), canonical)


@pytest.mark.parametrize("layout", ["basic", "RAF-DB/basic"])
def test_rafdb_basic_folder(tmp_path, layout):
    canonical = read_source("rafdb", synthetic.write_rafdb(tmp_path / "canonical" / "rafdb").parent)
    synthetic.write_rafdb(tmp_path / "extracted" / layout)
    assert locate("rafdb", tmp_path / "extracted").folder == (tmp_path / "extracted" / layout).parent  # holds basic/
    assert_same_file_records(read_source("rafdb", tmp_path / "extracted"), canonical)


def test_dataset_override_wins_over_the_search(tmp_path):
    synthetic.write_genki4k(tmp_path / "root" / "genki4k", n=6)
    synthetic.write_genki4k(tmp_path / "elsewhere", n=12, layout="archive")
    assert len(read_source("genki4k", tmp_path / "root")) == 6
    assert len(read_source("genki4k", tmp_path / "root", overrides={"genki4k": tmp_path / "elsewhere"})) == 12


def test_not_found_names_every_folder_and_file_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetNotFound) as error:
        locate("rafdb", tmp_path)
    message = str(error.value)
    for looked in (tmp_path, tmp_path / "a", tmp_path / "b"):
        assert str(looked) in message
    assert "basic/EmoLabel/list_patition_label.txt" in message
    with pytest.raises(DatasetNotFound, match="no --data-root and no --dataset"):
        locate("fer2013")


def test_datasets_command_reports_found_missing_and_broken(tmp_path, capsys):
    root = tmp_path / "downloads"
    synthetic.write_genki4k(root / "GENKI-R2009a", n=8, missing=1, corrupt=1, layout="archive")
    synthetic.write_fer2013(root / "fer2013", n=20, bad_rows=1, layout="folders")
    synthetic.write_imdb_wiki(root, "wiki", n=12, unknown_gender=2, no_face=1)
    (root / "imdb_crop").mkdir()
    (root / "imdb_crop" / "imdb.mat").write_bytes(b"truncated download")
    assert main(["datasets", "--data-root", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| dataset")}
    assert rows["genki4k"][1:4] == ["found", "GENKI-R2009a archive", str(root / "GENKI-R2009a")]
    assert rows["genki4k"][5] == "1 missing file, 1 unreadable image"
    assert rows["fer2013"][1:3] == ["found", "image folders train/, test/"]
    assert rows["fer2013"][5] == "1 unreadable image"
    assert rows["fer2013"][4].startswith("test ") and "train " in rows["fer2013"][4]
    assert rows["wiki"][1] == "found" and rows["wiki"][5] == "1 no face, 2 unknown gender"
    assert rows["wiki"][4] == "test 1, train 8 (gender labels)"  # 9 usable rows in the paper's proportions
    assert rows["imdb"][1] == "unusable" and "imdb.mat" in rows["imdb"][5]
    assert rows["rafdb"][1] == "missing"
    assert f"rafdb: looked in {root}," in out and "EmoLabel/list_patition_label.txt" in out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["datasets", "--data-root", str(empty), "--quiet"]) == 2
    assert main(["datasets", "--data-root", str(empty), "--dataset", f"wiki={root}", "--quiet"]) == 0
    assert "| wiki | found |" in capsys.readouterr().out


def test_bad_dataset_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["datasets", "--dataset", "celeba=/data"])
    assert "NAME=PATH with NAME one of genki4k, fer2013, wiki, imdb, rafdb" in capsys.readouterr().err


def test_train_on_extracted_downloads_with_only_data_root(tmp_path):
    root = tmp_path / "downloads"
    synthetic.write_genki4k(root / "GENKI-R2009a", n=8, layout="archive")
    synthetic.write_fer2013(root / "fer2013", n=30, layout="folders")
    synthetic.write_imdb_wiki(root, "wiki", n=16)
    assert main(["train", "--config", "B2", "--epochs", "1", "--set", "batch_size=16", "--data-root", str(root),
                 "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
    assert (tmp_path / "run" / "metrics.csv").exists()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--data-root", str(root), "--cache",
                 str(tmp_path / "cache"), "--quiet"]) == 0
