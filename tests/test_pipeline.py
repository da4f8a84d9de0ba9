"""The whole analysis in-process on generated CIFAR-100-format data with a tiny trained model."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import sklearn.metrics

from helpers.config import Params
from helpers.errors import ConfigError, NumericalError, OutputError
from helpers.pipeline import Analysis

from conftest import run_params
from output_checks import check_outputs, read_csv


def make_params(cifar_root, ckpt, out, **kw) -> Params:
    return run_params(cifar_root, ckpt, out, **{"EMBEDDING": "tsne", **kw})


@pytest.fixture(scope="module")
def finished(cifar_root, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "gradcam_results"
    an = Analysis(make_params(cifar_root, tiny_checkpoint, out), progress=False)
    an.run_all()
    return an


def test_every_output_written_and_valid(finished):
    check_outputs(finished.out, num_classes=100, n_pair_galleries=5)


def test_confusion_matrix_matches_sklearn(finished):
    pr = finished.preds
    expected = sklearn.metrics.confusion_matrix(pr.labels, pr.preds, labels=list(range(100)))
    np.testing.assert_array_equal(finished.results["confusion"].values["cm"], expected)


def test_confusion_titles_say_each_fact_once(finished):
    conf, acc = finished.results["confusion"], f"{finished.preds.accuracy:.1%}"
    for fig in (conf.full_figure, conf.figures["confusion_matrix"]):
        title = fig.axes[0].get_title()
        assert title.count("accuracy") == 1 and title.count(acc) == 1, title


def test_inline_confusion_matrix_shows_the_most_confused_classes_and_says_where_the_full_one_is(finished):
    from helpers.compute.ordering import most_confused_classes
    from helpers.steps.confusion import INLINE_CLASSES
    conf, names = finished.results["confusion"], finished.names
    shown = [names[c] for c in most_confused_classes(conf.cm, conf.order, INLINE_CLASSES)]
    ax = conf.figures["confusion_matrix"].axes[0]
    assert INLINE_CLASSES == 25 and len(shown) == 25
    assert [t.get_text() for t in ax.get_xticklabels()] == shown == [t.get_text() for t in ax.get_yticklabels()]
    where = "\n".join(conf.notes) + ax.get_title()
    assert where.count("confusion_matrix_full.png") == 2 and where.count("confusion_matrix_interactive.html") == 2
    assert str(finished.params.OUTPUT_DIR) in conf.notes[0]
    assert len(conf.full_figure.axes[0].get_xticklabels()) == 100        # the saved matrix still has every class
    from PIL import Image
    with Image.open(finished.out / "confusion_matrix_full.png") as full:
        assert full.size == (28 * 80, 26 * 80)


def test_per_class_csv_agrees_with_predictions(finished):
    pr = finished.preds
    rows = read_csv(finished.out / "per_class_accuracy.csv")
    for r in rows[:20]:
        c = int(r["class_id"])
        mask = pr.labels == c
        assert int(r["support"]) == mask.sum()
        assert int(r["correct"]) == (pr.preds[mask] == c).sum()
    assert rows[42]["class_name"] == "leopard" and rows[47]["class_name"] == "maple tree"


def test_summary_quotes_the_measured_numbers(finished):
    summary = (finished.out / "analysis_summary.txt").read_text()
    pr = finished.preds
    assert f"{pr.accuracy:.2%}" in summary
    share = finished.results["confusion"].values["superclass_share"]
    assert f"{share['share']:.1%}" in summary and "chance level 4.0%" in summary
    assert finished.cams.engine().path in summary


def test_gallery_names_follow_the_convention(finished):
    names = sorted(p.name for p in (finished.out / "worst_predictions").iterdir())
    assert names[0] == "class_000_apple.png" and "class_042_leopard.png" in names
    assert "class_047_maple_tree.png" in names


def test_rerun_uses_the_cache_and_force_recompute_skips_it(cifar_root, tiny_checkpoint, finished):
    params = make_params(cifar_root, tiny_checkpoint, finished.out)
    again = Analysis(params, progress=False)
    again.load_model(); again.load_data(); again.predict()
    assert again.cache_hit
    np.testing.assert_array_equal(again.preds.logits, finished.preds.logits)
    forced = Analysis(make_params(cifar_root, tiny_checkpoint, finished.out, FORCE_RECOMPUTE=True), progress=False)
    forced.load_model(); forced.load_data(); forced.predict()
    assert not forced.cache_hit


def test_rerun_with_fewer_outputs_removes_stale_files(cifar_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "res"
    an = Analysis(make_params(cifar_root, tiny_checkpoint, out, N_PAIR_GALLERIES=3), progress=False)
    an.run_all()
    assert len(list(out.glob("confused_pair_*.png"))) == 3
    an2 = Analysis(make_params(cifar_root, tiny_checkpoint, out, N_PAIR_GALLERIES=1), progress=False)
    an2.run_all()
    assert [p.name.split("_")[2] for p in out.glob("confused_pair_*.png")] == ["1"]
    manifest = json.loads((out / ".manifest.json").read_text())
    assert all((out / rel).exists() for rel in manifest)
    assert an2.results["report"].values["removed_stale"]


def test_unknown_cam_method_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match="gradcam\\+\\+.*layercam"):
        Analysis(Params(OUTPUT_DIR=str(tmp_path), CAM_METHOD="gradkam"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_fails_before_compute(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(OutputError, match="not writable"):
        Analysis(Params(OUTPUT_DIR=str(locked / "out")))


def test_output_path_that_is_a_file_fails_before_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="OUTPUT_DIR"):
        Analysis(Params(OUTPUT_DIR=str(blocker / "out")))


def test_nan_logits_stop_the_run(cifar_root, tiny_checkpoint, tmp_path):
    import torch
    an = Analysis(make_params(cifar_root, tiny_checkpoint, tmp_path / "o"), progress=False)
    an.load_model(); an.load_data()
    fc = an.loaded.module.fc if hasattr(an.loaded.module, "fc") else an.loaded.module.model.fc
    with torch.no_grad():
        fc.bias[3] = float("nan")
    with pytest.raises(NumericalError, match=f"{len(an.data.labels)} of {len(an.data.labels)} images"):
        an.predict()
    assert not (tmp_path / "o" / "confusion_matrix_full.png").exists()


def test_inference_gets_every_thread_and_the_small_batches_after_it_half(cifar_root, tiny_checkpoint, tmp_path,
                                                                         monkeypatch):
    import torch

    import helpers.pipeline as pipeline
    monkeypatch.setattr(pipeline, "default_threads", lambda: 2)
    seen = {}
    real_inference, real_deep_dive = pipeline.run_inference, Analysis.deep_dive

    def inference(*args, **kwargs):
        seen["inference"] = torch.get_num_threads()
        return real_inference(*args, **kwargs)

    def deep_dive(self):
        seen["deep_dive"] = torch.get_num_threads()
        return real_deep_dive(self)
    monkeypatch.setattr(pipeline, "run_inference", inference)
    monkeypatch.setattr(Analysis, "deep_dive", deep_dive)
    before = torch.get_num_threads()
    try:
        an = Analysis(make_params(cifar_root, tiny_checkpoint, tmp_path / "out", N_PAIR_GALLERIES=1), progress=False)
        assert an.threads == 2
        an.run_all()
        assert seen == {"inference": 2, "deep_dive": 1}
        assert torch.get_num_threads() == 2   # given back when the analysis is done
    finally:
        torch.set_num_threads(before)
