"""models.report: Tables 3 and 4 laid out like the paper's, our figures converted from the
benchmark CSVs and the paper's beside them; absent results give None (named by the CLI)."""

import csv

from models.report import PAPER_TABLE3, PAPER_TABLE4, table3, table4


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table3_seconds_per_image_beside_the_paper(tmp_path):
    write_csv(tmp_path / "inference-cpu.csv", [
        {"network": "bknet", "batch": "1", "paper TITAN X ms/img": "20", "eager ms/img": "3.048",
         "fused ms/img": "1.577"},
        {"network": "resnet-v2", "batch": "128", "paper TITAN X ms/img": "71", "eager ms/img": "14.5",
         "fused ms/img": ""},
    ])
    head, *rows = table_rows(table3(tmp_path, "cpu"))
    assert head == ["framework", "batch", "paper (TITAN X) s/img", "eager s/img", "fused s/img"]
    assert rows[0] == ["bknet", "1", f"{PAPER_TABLE3['bknet']:.3f}", "0.00305", "0.00158"]
    assert rows[1] == ["resnet-v2", "128", "0.071", "0.01450", "-"]
    assert table3(tmp_path, "cuda") is None


def test_table4_minutes_beside_the_paper(tmp_path):
    write_csv(tmp_path / "training-cpu.csv", [
        {"network": "bknet", "reference s/step": "0.5", "reference min/epoch": "6.1", "reference total min": "1524"},
    ])
    head, row = table_rows(table4(tmp_path, "cpu"))
    epochs, minutes, total = PAPER_TABLE4["bknet"]
    assert head[:4] == ["framework", "epochs", "paper min/epoch", "paper total min"]
    assert row == ["bknet", str(epochs), f"{minutes:.2f}", str(total), "6.1", "1524"]
    assert table4(tmp_path / "nothing", "cpu") is None
