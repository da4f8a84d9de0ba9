"""The docs say what the code does: commands, parameters and output names stay in sync."""
from __future__ import annotations

import re

from conftest import REPO

from helpers.__main__ import build_parser
from helpers.config import Params

README = (REPO / "README.md").read_text(encoding="utf-8")
GUIDE = (REPO / "VISUAL_GUIDE.txt").read_text(encoding="utf-8")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(line for block in bash_blocks(README) for line in block.splitlines() if "pytest" in line)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd.strip() in ci.splitlines()


def test_readme_analysis_command_parses_with_the_cli():
    cmd = next(line for block in bash_blocks(README) for line in block.splitlines() if "helpers analyze" in line)
    args = cmd.split("-m helpers", 1)[1].split()
    parsed = build_parser().parse_args(args)
    assert parsed.command == "analyze" and parsed.DATA_ROOT == "./data"


def test_readme_documents_every_parameter():
    for name in Params.names():
        assert f"`{name}`" in README, name


def test_no_placeholders_left():
    for text in (README, GUIDE, (REPO / "QUICKSTART.md").read_text(encoding="utf-8")):
        assert "PERFORMANCE_TABLE" not in text and "TROUBLESHOOTING\n" not in text and "TODO" not in text


def test_visual_guide_explains_every_output_file():
    for name in ("confusion_matrix_full.png", "per_class_accuracy.csv", "per_class_accuracy_interactive.html",
                 "most_confused_pairs.csv", "top_confused_pairs.png", "worst_predictions/class_NNN_name.png",
                 "confused_pair_K_TTT_true_to_PPP_pred.png", "group_pair_AAA_A_to_BBB_B.png", "analysis_summary.txt", "recommendations.txt", "index.html",
                 "group_confusion.png", "reliability_diagram.png", "label_suspects.png", "group_embedding"):
        assert name in GUIDE, name
    GUIDE.encode("utf-8")


def test_readme_images_exist():
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (REPO / target).is_file(), target
