"""Image folders of every kind and class names of every kind: mixed sizes and IMAGE_SIZE, 16-bit PNGs,
decompression bombs, class-name lookup (exact match first, duplicates refused), non-ASCII class names in file
names and in the galleries' titles. In the style of test_errors.py: error types and the key words of the message;
for file names, the set of files written."""
from __future__ import annotations

import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.__main__ import build_parser, params_from_args
from helpers.config import Params
from helpers.data.datasets import Dataset, load_dataset, model_input_size, resolve_class_names, safe_filename
from helpers.data.synthetic import write_cifar10, write_fake_imagefolder
from helpers.errors import ConfigError, DataError
from helpers.pipeline import Analysis
from helpers.plots.gallery import render_gallery
from helpers.steps.context import Run

from conftest import run_params
from tiny_model import TinyNet

# 12 class names in one non-Latin script that differ only in the characters the old safe_filename dropped
# (every one of them used to become "unnamed"); sorted, as ImageFolder numbers its class folders.
KANJI = sorted(["楓", "橡", "松", "杉", "柳", "桜", "梅", "竹", "樫", "椿", "桐", "柏"])


# ---------------------------------------------------------------------------------------------- image sizes
def test_mixed_sizes_follow_image_size_and_the_resize_is_recorded(tmp_path):
    write_fake_imagefolder(tmp_path, 2, n_per_class=2, sizes=[20, 40])
    ds = load_dataset("imagefolder", root=tmp_path, image_size=[24, 28])
    assert ds.images.shape == (4, 24, 28, 3)
    assert "20x20" in ds.resize_note and "40x40" in ds.resize_note and "to 24x28" in ds.resize_note
    assert "IMAGE_SIZE" in ds.resize_note
    expected = np.asarray(Image.open(tmp_path / "class_0" / "img_001.png").resize((28, 24), Image.Resampling.BILINEAR))
    assert np.array_equal(ds.images[1], expected)
    assert load_dataset("imagefolder", root=tmp_path, image_size=16).images.shape == (4, 16, 16, 3)
    # no IMAGE_SIZE: the model's known input size (timm's pretrained_cfg), else 32x32, said either way
    timm_like = torch.nn.Linear(1, 1)
    timm_like.pretrained_cfg = {"input_size": (3, 48, 40)}
    by_model = load_dataset("imagefolder", root=tmp_path, model=timm_like)
    assert by_model.images.shape == (4, 48, 40, 3) and "48x40" in by_model.resize_note
    assert "model" in by_model.resize_note and "IMAGE_SIZE" in by_model.resize_note
    default = load_dataset("imagefolder", root=tmp_path)
    assert default.images.shape == (4, 32, 32, 3) and "default" in default.resize_note
    # images of one size are kept as they are, and nothing is said
    write_fake_imagefolder(tmp_path / "same", 2, n_per_class=2, size=20)
    assert load_dataset("imagefolder", root=tmp_path / "same").resize_note == ""


def test_model_input_size_from_timm_and_torchvision_configs():
    import torchvision
    assert model_input_size(None) is None and model_input_size(TinyNet(num_classes=3)) is None
    net = TinyNet(num_classes=3)
    net.default_cfg = {"input_size": (3, 64, 64)}
    assert model_input_size(SimpleNamespace(inner=net, arch="timm:x")) == (64, 64)
    loaded = SimpleNamespace(inner=torchvision.models.resnet18(weights=None), arch="torchvision:resnet18")
    assert model_input_size(loaded) == (224, 224)


def test_image_size_parameter_from_notebook_env_and_cli(tmp_path):
    assert Params(IMAGE_SIZE=[24, 28]).validate().IMAGE_SIZE == [24, 28]
    assert Params(IMAGE_SIZE=64).validate().IMAGE_SIZE == 64
    assert Params().with_env({"GRADCAM_IMAGE_SIZE": "[24, 28]"}).validate().IMAGE_SIZE == [24, 28]
    assert Params().with_env({"GRADCAM_IMAGE_SIZE": "224"}).validate().IMAGE_SIZE == 224
    assert Params().with_env({"GRADCAM_IMAGE_SIZE": "none"}).IMAGE_SIZE is None
    args = build_parser().parse_args(["analyze", "--image-size", "[24, 28]"])
    assert params_from_args(args).IMAGE_SIZE == [24, 28]
    for bad in ("big", [0, 4], [1, 2, 3], 2.5, True):
        with pytest.raises(ConfigError, match="IMAGE_SIZE must be"):
            Params(IMAGE_SIZE=bad).validate()
    write_fake_imagefolder(tmp_path, 2, n_per_class=1, size=8)
    with pytest.raises(ConfigError, match="IMAGE_SIZE"):
        load_dataset("imagefolder", root=tmp_path, image_size="big")


# ---------------------------------------------------------------------------------------------- pixel formats
def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (12, 12), dtype=np.uint8)
    (tmp_path / "eight").mkdir()
    (tmp_path / "sixteen").mkdir()
    Image.fromarray(gray8, mode="L").save(tmp_path / "eight" / "a.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "sixteen" / "a.png")
    assert Image.open(tmp_path / "sixteen" / "a.png").mode.startswith("I")   # a real 16-bit PNG
    ds = load_dataset("imagefolder", root=tmp_path)
    want = np.repeat(gray8[..., None], 3, axis=-1)
    assert np.array_equal(ds.images[0], want) and np.array_equal(ds.images[1], want)
    assert ds.images[1].mean() < 200   # it used to load as (almost) white


@pytest.mark.parametrize("limit", [100, 600])   # over 2x the limit: Pillow's error; over 1x: its warning
def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch, limit):
    write_fake_imagefolder(tmp_path, ["a"], n_per_class=1, size=32)   # 1024 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "a" / "img_000.png") in msg
    assert "decompression bomb" in msg and "MAX_IMAGE_PIXELS" in msg and "Shrink or delete" in msg


# ---------------------------------------------------------------------------------------------- class names
def test_exact_names_take_precedence_over_normalised_ones():
    names = ["a b", "a_b", "Maple_Tree", "c"]
    assert resolve_class_names(["a b", "a_b", "c", "maple tree", 3], names) == [0, 1, 3, 2, 3]
    with pytest.raises(ConfigError) as info:   # normalised, it would be either: refused, naming both
        resolve_class_names(["A B"], names)
    assert "'a b'" in str(info.value) and "'a_b'" in str(info.value) and "exact name" in str(info.value)


def test_group_classes_reach_both_near_identical_names(tmp_path):
    write_fake_imagefolder(tmp_path, ["a b", "a_b", "c"], n_per_class=1, size=8)
    ds = load_dataset("imagefolder", root=tmp_path)
    from helpers.steps import deep_dive
    assert deep_dive.given_group(Params(GROUP_CLASSES=["a_b", "a b"], GROUP_SIZE=2), ds) == [1, 0]
    assert resolve_class_names(["a_b", "a b"], ds.class_names, "GROUP_CLASSES") == [1, 0]


def test_duplicate_class_names_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"duplicate names: 'cat' \(2 times\)"):
        Dataset(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]), class_names=["cat", "dog", "cat"])
    folder = write_cifar10(tmp_path, n_test=20)
    meta = folder / "batches.meta"
    d = pickle.loads(meta.read_bytes())
    d["label_names"] = ["cat"] * 2 + list(d["label_names"][2:])
    meta.write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match="duplicate names: 'cat'"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_every_per_class_and_per_pair_name_is_distinct():
    run = SimpleNamespace(data=SimpleNamespace(class_names=KANJI + ["a b", "a_b", "a/b"]))
    slugs = [Run.class_slug(run, i) for i in range(len(run.data.class_names))]
    assert slugs[:2] == [f"000_{KANJI[0]}", f"001_{KANJI[1]}"] and slugs[-1] == "014_a_b"
    assert len(set(slugs)) == len(slugs)
    assert all(safe_filename(n) == n for n in KANJI)
    pairs = {f"group_pair_{a}_to_{b}.png" for a in slugs for b in slugs if a != b}
    assert len(pairs) == len(slugs) * (len(slugs) - 1)


def test_twelve_non_latin_classes_write_twelve_distinct_readable_galleries(tmp_path):
    folder = write_fake_imagefolder(tmp_path / "images", KANJI, n_per_class=6, sizes=[20, 28])
    torch.manual_seed(0)
    torch.save(TinyNet(num_classes=12).state_dict(), tmp_path / "tiny12.pt")
    params = run_params(folder, tmp_path / "tiny12.pt", tmp_path / "out", DATASET="imagefolder", EMBEDDING="tsne",
                        IMAGE_SIZE=24, N_PAIR_GALLERIES=3, PAIR_EXAMPLES=2, N_WORST=2, N_BEST=1)
    an = Analysis(params, progress=False)
    res = an.run_all()
    out = an.out
    assert an.data.class_names == KANJI
    assert an.data.images.shape[1:3] == (24, 24)
    summary = (out / "analysis_summary.txt").read_text(encoding="utf-8")
    assert re.search(r"Images: +resized from 20x20 \(36\), 28x28 \(36\) to 24x24 \(IMAGE_SIZE\)", summary)
    # one class gallery per class, with its id and its readable name
    galleries = {p.name for p in (out / "worst_predictions").iterdir()}
    assert galleries == {f"class_{i:03d}_{n}.png" for i, n in enumerate(KANJI)}
    # pair galleries: rank, then both classes' ids and names; every one listed is on disk, none shared a name
    pairs = res["pair_galleries"].files
    assert len(pairs) == len(set(pairs)) == min(3, len(res["confusion"].pairs))
    assert {p.name for p in out.glob("confused_pair_*.png")} == set(pairs)
    for k, name in enumerate(pairs, start=1):
        assert re.fullmatch(rf"confused_pair_{k}_(\d{{3}})_(.)_to_(\d{{3}})_(.)\.png", name), name
        t, tn, q, qn = re.fullmatch(r"confused_pair_\d+_(\d{3})_(.)_to_(\d{3})_(.)\.png", name).groups()
        assert KANJI[int(t)] == tn and KANJI[int(q)] == qn
    # group pairs: one file per gallery drawn, each with both ids, none overwritten by another
    shown = res["deep_dive"].values["group_pairs"]
    expected = {f"group_pair_{g['true']:03d}_{KANJI[g['true']]}_to_{g['pred']:03d}_{KANJI[g['pred']]}.png"
                for g in shown}
    assert len(expected) == len(shown) >= 1
    assert {p.name for p in (out / "deep_dive").glob("group_pair_*.png")} == expected


# ---------------------------------------------------------------------------------------------- fonts
def _title_strip(title: str) -> np.ndarray:
    return np.asarray(render_gallery(title, []))[:40]


def test_titles_never_show_silent_tofu():
    # Characters no installed font has are written as their code point, visibly ...
    unknown = "\U000F0000"   # a private-use code point: no font has a glyph for it
    assert np.array_equal(_title_strip(f"Class 000: {unknown}"), _title_strip("Class 000: [U+F0000]"))
    # ... and two class names in a script the default font lacks still read differently (real glyphs from a font
    # that has them when one is installed, else their code points), never as two identical boxes.
    a, b = _title_strip(f"Class 000: {KANJI[0]}"), _title_strip(f"Class 000: {KANJI[1]}")
    assert not np.array_equal(a, b)
    assert not np.array_equal(_title_strip(f"Class 000: {KANJI[0]}"), _title_strip("Class 000: \u25a1"))
    # Cyrillic is in DejaVu Sans: drawn as is
    assert not np.array_equal(_title_strip("Class 000: клён"), _title_strip("Class 000: [U+043A]"))


def test_matplotlib_figures_never_draw_silent_boxes():
    """Class names reach the matplotlib figures too: glyphs an installed font has are drawn (Cyrillic is in
    DejaVu Sans), and a character no installed font has is shown as its code point, in every text of the figure."""
    import numpy as np
    from matplotlib.text import Text

    from helpers.plots import figures
    from helpers.plots.fonts import fallback_families, visible_text

    uncovered = "\U000F0000"   # private use: no font has it
    names = ["клён", f"a{uncovered}", "oak"]
    fig = figures.plot_group_confusion(np.ones((3, 3), int), np.full((3, 3), 100 / 3), names)
    texts = [t.get_text() for t in fig.findobj(Text)]
    assert "клён" in texts and "a[U+F0000]" in texts and not any(uncovered in t for t in texts)
    assert visible_text("клён") == "клён" and fallback_families()[0] == "DejaVu Sans"
    assert all(t.get_fontfamily()[:1] == ["DejaVu Sans"] for t in fig.findobj(Text) if t.get_text() == "oak")
