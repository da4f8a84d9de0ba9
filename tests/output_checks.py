"""Checks that a finished run's output folder holds every promised file, each complete and valid."""
from __future__ import annotations

import csv
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

PER_CLASS_COLUMNS = ["class_id", "class_name", "superclass", "support", "correct", "accuracy",
                     "mean_confidence", "top_wrong_prediction", "top_wrong_count"]
PAIR_COLUMNS = ["true_name", "pred_name", "count", "share_of_true", "same_superclass"]

TOP_LEVEL = ["confusion_matrix_full.png", "per_class_accuracy.csv", "per_class_accuracy_interactive.html",
             "most_confused_pairs.csv", "top_confused_pairs.png", "analysis_summary.txt",
             "recommendations.txt", "index.html"]
DEEP_DIVE = ["group_confusion.png", "group_confusion.csv", "reliability_diagram.png", "label_suspects.png",
             "group_embedding.html", "group_embedding.png", "head_cosine_similarity.png"]


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "script" and attrs.get("src"):
            self.scripts.append(attrs["src"])


def parse_html(path: Path) -> _Parser:
    parser = _Parser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert "html" in parser.tags and "body" in parser.tags, path
    assert not any(s.startswith(("http://", "https://", "//")) for s in parser.scripts), f"CDN script in {path}"
    return parser


def check_png(path: Path, min_size=(100, 100)) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.width >= min_size[0] and im.height >= min_size[1], (path, im.size)
        return im.size


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def check_outputs(out: Path, num_classes: int, n_pair_galleries: int, deep_dive: bool = True) -> None:
    for name in TOP_LEVEL:
        assert (out / name).is_file(), f"missing {name}"
    w, h = check_png(out / "confusion_matrix_full.png", (1000, 1000) if num_classes >= 50 else (300, 300))
    check_png(out / "top_confused_pairs.png")
    rows = read_csv(out / "per_class_accuracy.csv")
    assert len(rows) == num_classes
    assert list(rows[0].keys()) == PER_CLASS_COLUMNS
    assert [int(r["class_id"]) for r in rows] == list(range(num_classes))
    pairs = read_csv(out / "most_confused_pairs.csv")
    assert pairs and all(c in pairs[0] for c in PAIR_COLUMNS)
    parse_html(out / "per_class_accuracy_interactive.html")
    galleries = sorted((out / "worst_predictions").glob("class_*.png"))
    assert len(galleries) == num_classes
    for g in galleries[:3] + galleries[-2:]:
        check_png(g)
    pair_files = sorted(out.glob("confused_pair_*_to_*.png"))
    assert len(pair_files) == min(n_pair_galleries, len(pairs))
    assert {p.name.split("_")[2] for p in pair_files} == {str(k) for k in range(1, len(pair_files) + 1)}
    for p in pair_files:
        check_png(p)
    summary = (out / "analysis_summary.txt").read_text(encoding="utf-8")
    assert "Overall accuracy" in summary and "High-confidence errors" in summary
    assert (out / "recommendations.txt").read_text(encoding="utf-8").strip()
    index = parse_html(out / "index.html")
    for link in index.links:
        if not link.startswith(("http", "#")):
            assert (out / link).exists(), f"index.html links to missing {link}"
    if deep_dive:
        for name in DEEP_DIVE:
            path = out / "deep_dive" / name
            assert path.is_file(), f"missing deep_dive/{name}"
            if name.endswith(".png"):
                check_png(path, (150, 150))
            elif name.endswith(".html"):
                parse_html(path)
    leftovers = [p for p in out.rglob("*.tmp*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
