"""Multi-process inference (torchrun): shard bounds, the gallery-state merge, and a 2-process gloo run of
`python -m helpers analyze` whose outputs equal a single-process run's on the same real Fashion-MNIST data."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FMNIST_ARCH, REPO
from helpers.compute.metrics import gallery_examples
from helpers.data.datasets import load_dataset
from helpers.data.readers import SYSTEM_FASHION_MNIST
from helpers.model import distributed
from helpers.model.pass_cams import PRED, TRUE, PassCams
from helpers.model.cam_store import GalleryActivations
from helpers.model.inference import run_inference, to_tensor

pytestmark = pytest.mark.skipif(not (SYSTEM_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                                reason=f"Fashion-MNIST is not installed in {SYSTEM_FASHION_MNIST}")

N_TEST = 600
BATCH = 64
CLI_ARGS = ["--quiet", "--arch", FMNIST_ARCH, "--dataset", "fashion_mnist", "--data-root", str(SYSTEM_FASHION_MNIST),
            "--no-download", "--limit", str(N_TEST), "--batch-size", str(BATCH), "--device", "cpu",
            "--n-worst", "2", "--n-best", "1", "--top-pairs", "5", "--n-pair-galleries", "1", "--pair-examples", "2",
            "--cell-images", "2"]


@pytest.mark.parametrize("n, world, batch, expected", [
    (600, 2, 64, [(0, 320), (320, 600)]),                # 10 batches, the last one partial
    (5, 4, 2, [(0, 2), (2, 4), (4, 5), (5, 5)]),         # 3 batches over 4 ranks: one rank gets none
    (700, 3, 100, [(0, 300), (300, 500), (500, 700)]),   # 7 batches: the first rank takes the extra one
    (0, 2, 8, [(0, 0), (0, 0)]),
])
def test_shard_bounds_hand_computed(n, world, batch, expected):
    assert [distributed.shard_bounds(n, world, r, batch) for r in range(world)] == expected


@pytest.mark.parametrize("n, world, batch", [(1, 2, 1), (999, 4, 64), (1000, 3, 7), (64, 8, 64), (10_000, 5, 256)])
def test_shards_tile_the_set_in_whole_batches(n, world, batch):
    bounds = [distributed.shard_bounds(n, world, r, batch) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))   # contiguous, in rank order
    # Every batch boundary is one a single process has: the same batches, the same logits.
    assert all(a % batch == 0 and (b % batch == 0 or b == n) for a, b in bounds)
    n_batches = [-(-(b - a) // batch) for a, b in bounds]
    assert max(n_batches) - min(n_batches) <= 1


def test_world_from_env():
    assert distributed.world_from_env({}) is None
    assert distributed.world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    w = distributed.world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.is_main) == (3, 4, 1, 2, False)
    assert distributed.is_main_process({"WORLD_SIZE": "2", "RANK": "0"})
    assert not distributed.is_main_process({"WORLD_SIZE": "2", "RANK": "1"})


@pytest.fixture(scope="module")
def fmnist_model_and_inputs(fmnist_checkpoint):
    import fmnist_model
    model = fmnist_model.FashionCNN()
    model.load_state_dict(torch.load(fmnist_checkpoint, weights_only=True))
    data = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, download=False, limit=N_TEST)
    return model.eval(), to_tensor(data.images, data.mean, data.std), data.labels


def test_merged_shard_galleries_equal_one_pass_over_the_whole_set(fmnist_model_and_inputs):
    model, inputs, labels = fmnist_model_and_inputs
    layer = model.features[-1]
    whole = GalleryActivations(layer, 2, 1)
    preds = run_inference(model, inputs, labels, batch_size=BATCH, progress=False, gallery=whole)
    states = []
    for rank in range(3):
        a, b = distributed.shard_bounds(len(inputs), 3, rank, BATCH)
        shard = GalleryActivations(layer, 2, 1)
        run_inference(model, inputs[a:b], labels[a:b], batch_size=BATCH, progress=False,
                      gallery=distributed.OffsetGallery(shard, a))
        states.append(shard.kept_state())
    merged = GalleryActivations(layer, 2, 1)
    merged.merge_states(states)
    ref, got = whole.kept_state(), merged.kept_state()
    order_ref, order_got = np.argsort(ref["idx"]), np.argsort(got["idx"])
    for key in ("idx", "labels", "preds", "p_pred", "p_label"):
        np.testing.assert_array_equal(got[key][order_got], ref[key][order_ref])
    for i in ref["idx"]:
        assert torch.equal(merged.stack([i])[0], whole.stack([i])[0])
    # Independently of the streamed rule: every image a class gallery shows is among the kept ones.
    shown = {i for c in range(10) for part in gallery_examples(labels, preds.preds, preds.probs, c, 2, 1) for i in part}
    assert shown and shown <= set(got["idx"].tolist())
    assert len(got["idx"]) < sum(len(s["idx"]) for s in states)   # the merge selects


def test_merged_shard_pass_cams_equal_one_pass_over_the_whole_set(fmnist_model_and_inputs):
    model, inputs, labels = fmnist_model_and_inputs
    layer, weight = model.features[-1], model.fc.weight
    whole = PassCams(layer, weight, len(inputs))
    run_inference(model, inputs, labels, batch_size=BATCH, progress=False, observers=[whole])
    merged = PassCams(layer, weight, len(inputs))
    for rank in range(3):
        a, b = distributed.shard_bounds(len(inputs), 3, rank, BATCH)
        shard = PassCams(layer, weight, len(inputs))
        run_inference(model, inputs[a:b], labels[a:b], batch_size=BATCH, progress=False,
                      observers=[distributed.OffsetGallery(shard, a)])
        assert shard.kept_state()["rows"].tolist() == list(range(a, b))
        merged.merge_states([shard.kept_state()])
    assert whole.complete and merged.complete
    idx = np.arange(len(inputs))
    for which in (TRUE, PRED):
        np.testing.assert_array_equal(merged.maps(idx, which, (28, 28)), whole.maps(idx, which, (28, 28)))
    np.testing.assert_array_equal(merged.kept_state()["classes"], whole.kept_state()["classes"])
    with pytest.raises(ValueError, match="overlap"):
        merged.merge_states([whole.kept_state()])


def test_merge_treats_map_values_as_opaque():
    """Map values travel as they are (here tuples of tensors); only the selection decides which stay."""
    def state(idx, labels, preds, p_pred):
        idx = np.asarray(idx, np.int64)
        return {"idx": idx, "labels": np.asarray(labels, np.int64), "preds": np.asarray(preds, np.int64),
                "p_pred": np.asarray(p_pred, np.float32),
                "p_label": np.where(np.asarray(labels) == preds, p_pred, 0.1).astype(np.float32),
                "maps": [(torch.full((1,), float(i)), f"map {i}") for i in idx]}
    # Class 0, n_worst=1, n_best=0: the worst is the most confident error (image 7, p 0.9), then the correct ones.
    a = state([0, 1], [0, 0], [1, 0], [0.6, 0.8])
    b = state([7, 8], [0, 0], [1, 0], [0.9, 0.7])
    g = GalleryActivations(torch.nn.Identity(), 1, 0)
    g.merge_states([a, b])
    kept = g.kept_state()
    assert kept["idx"].tolist() == [1, 7]   # the one worst, plus the one most confident correct (n_best + n_worst)
    assert [m[1] for m in kept["maps"]] == ["map 1", "map 7"] and 7 in g and 0 not in g and 8 not in g
    with pytest.raises(ValueError, match="disjoint"):
        g.merge_states([a, a])


def test_to_device_moves_nested_tensors_only():
    value = (torch.ones(2), [torch.zeros(1), "label"], {"k": torch.ones(1)}, 3)
    moved = distributed.to_device(value, "meta")
    assert moved[0].device.type == "meta" and moved[1][0].device.type == "meta" and moved[2]["k"].device.type == "meta"
    assert moved[1][1] == "label" and moved[3] == 3 and isinstance(moved[1], list)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _summary_without_timings(path: Path) -> list[str]:
    """The summary less what measures time: the Timings line, the attribution methods' ms per map and the
    training pass's seconds and memory."""
    return [re.sub(r"; [0-9.]+ ms per map$", "", line) for line in path.read_text().splitlines()
            if not line.startswith(("Timings (s):", "Training-set evidence: "))]


def _without_timing_columns(path: Path) -> list[list[str]]:
    import csv
    rows = list(csv.reader(path.open()))
    timed = {i for i, name in enumerate(rows[0] if rows else []) if "seconds" in name}
    return [[v for i, v in enumerate(row) if i not in timed] for row in rows]


def _same_table(a: list[list[str]], b: list[list[str]]) -> bool:
    """Equal cell by cell; numbers within 1e-4 relative (1e-6 absolute), everything else exactly."""
    if len(a) != len(b) or any(len(r) != len(q) for r, q in zip(a, b)):
        return False
    for x, y in zip((v for r in a for v in r), (v for q in b for v in q)):
        if x == y:
            continue
        try:
            if not math.isclose(float(x), float(y), rel_tol=1e-4, abs_tol=1e-6):
                return False
        except ValueError:
            return False
    return True


N_TRAIN_SHARDED = 3000


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory) -> Path:
    """The real Fashion-MNIST's first N_TEST test and first N_TRAIN_SHARDED training images, as idx files: a
    training split small enough for the training-evidence pass in a test."""
    from conftest import _write_idx
    root = tmp_path_factory.mktemp("fmnist_small")
    for split, n in (("test", N_TEST), ("train", N_TRAIN_SHARDED)):
        ds = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, split=split, download=False, limit=n)
        prefix = "t10k" if split == "test" else "train"
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", ds.images[..., 0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", ds.labels)
    return root


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_process_writes(fmnist_checkpoint, small_fmnist, tmp_path):
    """With TRAIN_EVIDENCE on: both passes (the test set's, then the training split's) sharded over 2 gloo
    processes and gathered on rank 0, which writes exactly what one process writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one, two = tmp_path / "one", tmp_path / "two"
    args = [a if a != str(SYSTEM_FASHION_MNIST) else str(small_fmnist) for a in CLI_ARGS] + [
        "--model-path", str(fmnist_checkpoint), "--train-evidence"]
    single = subprocess.run([sys.executable, "-m", "helpers", "analyze", *args, "--output-dir", str(one)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "helpers", "analyze", *args, "--output-dir", str(two)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]   # every rank exited 0
    assert multi.stdout.count("Accuracy ") == 1          # only rank 0 reports (and writes)

    assert _files(two) == _files(one)   # nothing more: no rank > 0 staging folder, probe or cache
    key = next(c.stem for c in (one / ".cache").glob("*.npz") if not c.stem.endswith("-derived"))
    with np.load(one / ".cache" / f"{key}.npz") as a, np.load(two / ".cache" / f"{key}.npz") as b:
        assert sorted(a.files) == sorted(b.files) and "features" in a.files
        for name in a.files:   # the same batches: logits, probs, preds and features bit for bit
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with np.load(one / ".cache" / f"{key}-derived.npz") as a, np.load(two / ".cache" / f"{key}-derived.npz") as b:
        cams_one = {tuple(k): v for k, v in zip(a["cam_index"].tolist(), a["cam_values"])}
        cams_two = {tuple(k): v for k, v in zip(b["cam_index"].tolist(), b["cam_values"])}
    # The same CAMs; later CAM batches hold them in another order, so float32 sums differ in the last bit.
    assert cams_one.keys() == cams_two.keys()
    for k, cam in cams_one.items():
        np.testing.assert_allclose(cams_two[k], cam, rtol=0, atol=1e-5, err_msg=str(k))
    csvs = sorted(f for f in _files(one) if f.endswith(".csv"))
    assert "per_class_accuracy.csv" in csvs
    for rel in csvs:   # CAM-derived numbers within float noise: one process reads them from the pass's own
        # Grad-CAMs (helpers.model.pass_cams), the shards from batched fast-path CAMs (measured: 2.6e-6 relative)
        assert _same_table(_without_timing_columns(two / rel), _without_timing_columns(one / rel)), rel
    # The class galleries show the same images with the same CAMs: the same pixels.
    galleries = sorted(f for f in _files(one) if f.startswith("worst_predictions/"))
    assert galleries
    from PIL import Image
    for rel in galleries:
        assert np.array_equal(np.asarray(Image.open(one / rel)), np.asarray(Image.open(two / rel))), rel
    assert _summary_without_timings(two / "analysis_summary.txt") == _summary_without_timings(one / "analysis_summary.txt")
    # The training evidence ran, from features both ranks computed (the same CSVs and pictures as above).
    assert "deep_dive/near_duplicates.csv" in csvs and any(f.startswith("deep_dive/train_neighbours_") for f in _files(one))
    for rel in (f for f in _files(one) if f.startswith("deep_dive/train_neighbours_") or f.endswith("near_duplicates.png")):
        assert np.array_equal(np.asarray(Image.open(one / rel)), np.asarray(Image.open(two / rel))), rel
    lines = {d: [ln for ln in (d / "analysis_summary.txt").read_text().splitlines()
                 if ln.startswith("Training-set evidence: ")] for d in (one, two)}
    assert len(lines[one]) == 1 and f"{N_TRAIN_SHARDED} training images in" in lines[one][0]
    assert "torchrun" not in lines[one][0] and " on 2 torchrun processes" in lines[two][0]


def _sharded_features_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of 2 gloo processes: sharded_features over 5 images in batches of 2 (ranks 0 and 1 take 4 and 1) and
    of 8 (rank 1's shard is empty), then a feature pass that fails on rank 1 only, then all_agree with rank 1
    disagreeing; each rank saves what it saw."""
    import json
    import torch.distributed as dist
    from helpers.model.inference import feature_pass
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = distributed.current()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(),
                                    torch.nn.Linear(5, 3)).eval()
        images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3) * 3
        seen = {}
        for batch in (2, 8):
            feats = distributed.sharded_features(world, feature_pass)(model, images, (0.5,) * 3, (0.25,) * 3,
                                                                      batch_size=batch, progress=False)
            seen[f"features_{batch}"] = None if feats is None else feats.astype(np.float32).tolist()

        def failing(*args, **kwargs):
            if world.rank == 1:
                raise MemoryError("out of memory on rank 1")
            return feature_pass(*args, **kwargs)
        try:
            distributed.sharded_features(world, failing)(model, images, (0.5,) * 3, (0.25,) * 3, batch_size=2,
                                                         progress=False)
            seen["failed"] = ""
        except RuntimeError as exc:
            seen["failed"] = str(exc)
        seen["agree"] = distributed.all_agree(world, world.rank == 0)
        seen["agree_all"] = distributed.all_agree(world, True)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_sharded_features_gather_an_empty_shard_and_a_failing_rank_fails_every_rank(tmp_path):
    """Two gloo processes: the gathered features equal one feature_pass over all images when one rank's shard is
    empty; a failure on one rank raises on both (neither waits for the other); all_agree is true only when every
    rank says so."""
    import json

    import torch.multiprocessing as mp

    from helpers.model.inference import feature_pass
    mp.spawn(_sharded_features_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(),
                                torch.nn.Linear(5, 3)).eval()
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3) * 3
    ref = feature_pass(model, images, (0.5,) * 3, (0.25,) * 3, batch_size=2, progress=False).astype(np.float32)
    assert ref.shape == (5, 5) and ref.std() > 0
    np.testing.assert_array_equal(np.asarray(seen[0]["features_2"], np.float32), ref)   # gathered, in order
    np.testing.assert_array_equal(np.asarray(seen[1]["features_2"], np.float32), ref[4:])   # rank 1's shard
    np.testing.assert_allclose(np.asarray(seen[0]["features_8"], np.float32), ref, atol=1e-3)   # one batch
    assert seen[1]["features_8"] is None   # rank 1 had no images
    assert "rank 1: MemoryError: out of memory on rank 1" in seen[0]["failed"]
    assert "MemoryError: out of memory on rank 1" in seen[1]["failed"]
    assert [s["agree"] for s in seen] == [False, False] and [s["agree_all"] for s in seen] == [True, True]


def _load_order_worker(rank: int, init_file: str, out_dir: str, data_root: str, ckpt: str) -> None:
    """One of 2 gloo processes running what `python -m helpers analyze` runs up to the pass; loading the test data
    is slowed on rank 0 and every load of it is recorded with its start and end time."""
    import json
    import time as clock

    import torch.distributed as dist

    import helpers.pipeline as pipeline
    from conftest import run_params
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loads, real = [], pipeline.load_dataset

    def recorded(*args, **kwargs):
        start = clock.time()
        if rank == 0:
            clock.sleep(1.0)   # a download, say
        out = real(*args, **kwargs)
        loads.append([start, clock.time()])
        return out
    pipeline.load_dataset = recorded
    try:
        an = pipeline.Analysis(run_params(data_root, ckpt, Path(out_dir) / "out", BATCH_SIZE=64), progress=False)
        if rank == 0:
            an.load_model()
            an.load_data()
        an.predict()   # a worker: what helpers.__main__ calls
        if rank == 0:
            an.outputs.close(raise_errors=False)
            an.outputs.abandon()
        Path(out_dir, f"loads{rank}.json").write_text(json.dumps(loads))
    finally:
        dist.destroy_process_group()


def test_workers_load_the_test_data_after_rank_0_so_a_download_happens_once(cifar_root, tiny_checkpoint, tmp_path):
    """Under torchrun the workers read DATA_ROOT only once rank 0 has read (or downloaded) it: rank 1's one load
    of the test data starts after rank 0's ended."""
    import json

    import torch.multiprocessing as mp
    mp.spawn(_load_order_worker, args=(str(tmp_path / "init"), str(tmp_path), str(cifar_root), str(tiny_checkpoint)),
             nprocs=2, join=True)
    loads = [json.loads((tmp_path / f"loads{r}.json").read_text()) for r in (0, 1)]
    assert len(loads[0]) == 1 and len(loads[1]) == 1
    assert loads[1][0][0] >= loads[0][0][1]
