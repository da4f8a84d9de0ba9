"""PassInputs: the tail's inputs kept during the inference pass within a budget, errors first, in an order fixed
before the pass (so batches and torchrun shards keep the same set), and CAMs from them equal pytorch-grad-cam's."""
from __future__ import annotations

import numpy as np
import torch

from helpers.model.cam_store import CamStore, tail_layer_values
from helpers.model.cams import CamEngine
from helpers.model.inference import run_inference
from helpers.model.pass_inputs import PassInputs

from test_tail_cams import TOL, MlpHeadCNN, images, library_gradcam

N, SIDE = 90, 16


def _model_and_data():
    torch.manual_seed(0)
    model = MlpHeadCNN().eval()
    return model, images(N, SIDE, seed=5), np.arange(N) % 6


def _pass(model, x, labels, keeper, batch_size: int, start: int = 0, stop: int = N):
    """run_inference over images [start, stop) with `keeper` seeing global indices."""
    class Offset:
        def capture(self):
            return keeper.capture()

        def update(self, s, probs, lab, preds):
            keeper.update(start + s, probs, lab, preds)
    return run_inference(model, x[start:stop], labels[start:stop], batch_size=batch_size, progress=False,
                         observers=[Offset()])


def _expected(preds, labels, seed: int, cap: int) -> list[int]:
    """By hand: the errors, then the correct images, each in the seeded permutation's order; the first `cap`."""
    order = np.random.default_rng(seed).permutation(N)
    wrong = preds != labels
    ranked = sorted(range(N), key=lambda i: (not wrong[i], order[i]))
    return sorted(ranked[:cap])


def test_within_the_budget_every_image_is_kept_and_its_cams_equal_pytorch_grad_cam():
    model, x, labels = _model_and_data()
    engine = CamEngine(model, input_shape=(3, SIDE, SIDE), batch_size=32)
    assert engine.cam_path.kind == "tail"
    keeper = PassInputs(engine.layer, engine.inference_keep, N, seed=3)
    preds = _pass(model, x, labels, keeper, batch_size=16).preds
    assert len(keeper) == N and keeper.nbytes == N * 16 * (SIDE // 2) ** 2 * 4   # one (16, 8, 8) float32 map each
    decoded = []

    class Streamed:   # a streamed test set: every read decodes images
        shape = x.shape

        def __len__(self):
            return len(x)

        def __getitem__(self, idx):
            decoded.append(len(idx))
            return x[idx]
    store = CamStore(lambda method, layer: engine, Streamed())
    store.pass_inputs = keeper
    wanted = [3, 17, 40, 41, 88]
    classes = [int(preds[i]) for i in wanted] + [int(labels[i]) for i in wanted]
    forwarded = []
    handle = model.register_forward_hook(lambda _m, inputs, _out: forwarded.append(len(inputs[0])))
    try:
        got = store.get(wanted + wanted, classes)
    finally:
        handle.remove()
    assert store.n_from_activations == len(set(zip(wanted + wanted, classes)))
    assert sum(forwarded) == 8   # only the one-time check against pytorch-grad-cam ran the model
    np.testing.assert_allclose(got, library_gradcam(model, engine.layer, x[wanted + wanted], classes), atol=TOL)
    assert decoded == [4]                    # the check's images only, not all that were asked for
    more = [5, 6, 7, 60, 61, 62]
    again = store.get(more, [int(preds[i]) for i in more])
    assert decoded == [4]                    # checked once: later maps need only the kept values
    np.testing.assert_allclose(again, library_gradcam(model, engine.layer, x[more], [int(preds[i]) for i in more]),
                               atol=TOL)


def test_over_the_budget_the_errors_come_first_in_the_seeded_order_whatever_the_batches():
    model, x, labels = _model_and_data()
    engine = CamEngine(model, input_shape=(3, SIDE, SIDE), batch_size=32)
    row_bytes = 16 * (SIDE // 2) ** 2 * 4
    cap = 25
    kept_sets = []
    for batch_size in (7, 16, 90):
        keeper = PassInputs(engine.layer, engine.inference_keep, N, seed=11, budget_bytes=cap * row_bytes)
        preds = _pass(model, x, labels, keeper, batch_size=batch_size).preds
        assert len(keeper) == cap and keeper.nbytes <= cap * row_bytes
        kept_sets.append([i for i in range(N) if i in keeper])
    expected = _expected(preds, labels, seed=11, cap=cap)
    assert 0 < int((preds != labels).sum()) and all(k == expected for k in kept_sets)


def test_shards_merged_keep_what_one_process_keeps_and_refuse_overlaps():
    model, x, labels = _model_and_data()
    engine = CamEngine(model, input_shape=(3, SIDE, SIDE), batch_size=32)
    budget = 30 * 16 * (SIDE // 2) ** 2 * 4
    whole = PassInputs(engine.layer, engine.inference_keep, N, seed=2, budget_bytes=budget)
    _pass(model, x, labels, whole, batch_size=16)
    shards = [PassInputs(engine.layer, engine.inference_keep, N, seed=2, budget_bytes=budget) for _ in range(3)]
    for keeper, (a, b) in zip(shards, [(0, 32), (32, 64), (64, N)]):
        _pass(model, x, labels, keeper, batch_size=16, start=a, stop=b)
    main = shards[0]
    main.merge_states([s.kept_state() for s in shards[1:]])
    assert [i for i in range(N) if i in main] == [i for i in range(N) if i in whole]
    rows = [i for i in range(N) if i in whole]
    for got, want in zip(main.stack(rows), whole.stack(rows)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    try:
        main.merge_states([shards[1].kept_state()])
    except ValueError as exc:
        assert "overlap" in str(exc)
    else:
        raise AssertionError("merging a shard twice was accepted")


def test_layer_values_through_the_tail_equal_the_whole_models_margin_gradients():
    """The concepts step's activations, margin gradients and logits (cam_store.tail_layer_values): from the kept
    inputs where held, a head pass elsewhere, equal to one forward and backward through the whole model."""
    from helpers.compute.concepts import margin_gradients
    model, x, labels = _model_and_data()
    engine = CamEngine(model, input_shape=(3, SIDE, SIDE), batch_size=32)
    row_bytes = 16 * (SIDE // 2) ** 2 * 4
    keeper = PassInputs(engine.layer, engine.inference_keep, N, seed=3, budget_bytes=40 * row_bytes)
    _pass(model, x, labels, keeper, batch_size=16)
    store = CamStore(lambda method, layer: engine, x)
    store.pass_inputs = keeper
    wanted = np.array([int(i) for i in range(N) if i in keeper][:4] + [int(i) for i in range(N) if i not in keeper][:3])
    wanted = wanted[[6, 0, 4, 1, 5, 2, 3]]   # held and not held interleaved: the order of `indices` is kept
    true, pred = labels[wanted], (labels[wanted] + 1) % 6
    forwarded = []
    handle = model.register_forward_hook(lambda _m, inputs, _out: forwarded.append(len(inputs[0])))
    try:
        act, grad, logits = tail_layer_values(store, wanted, true, pred)
        act0, grad0, logits0 = tail_layer_values(store, wanted)
    finally:
        handle.remove()
    assert forwarded == []   # the whole model's forward never runs: the head and tail are graphs of their own
    ref_act, ref_grad, ref_logits = margin_gradients(model, engine.layer, x[torch.as_tensor(wanted)], true, pred)
    np.testing.assert_allclose(act, ref_act, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(act0, ref_act, atol=1e-5)
    np.testing.assert_allclose(logits0, ref_logits, atol=1e-5)
    assert grad0 is None
    gap_cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 6)).eval()
    gap_engine = CamEngine(gap_cnn, input_shape=(3, SIDE, SIDE))
    assert tail_layer_values(CamStore(lambda method, layer: gap_engine, x), wanted) is None   # the fast path


def test_on_the_fast_path_the_concepts_read_the_kept_maps_and_forward_only_the_rest():
    """A GAP -> Linear CNN keeps the target layer's map itself (predictions.pass_inputs on the fast path). The
    concepts step's activations and logits equal one forward pass through the model, which runs only for the
    images the budget did not hold; the tail path's store has no kept maps."""
    from types import SimpleNamespace

    from helpers.model.cam_store import kept_maps
    from helpers.model.cams import forward_with_activations
    from helpers.steps.model_concepts import _activations
    from helpers.steps.predictions import pass_inputs
    torch.manual_seed(0)
    gap_cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 6)).eval()
    x, labels = images(N, SIDE, seed=5), np.arange(N) % 6
    engine = CamEngine(gap_cnn, input_shape=(3, SIDE, SIDE), batch_size=32)
    store = CamStore(lambda method, layer: engine, x)
    keeper = pass_inputs(store, N, seed=3)
    assert engine.fast and keeper is not None and keeper.keep == engine.inference_keep
    keeper.budget_bytes = 50 * 8 * SIDE * SIDE * 4   # 50 of the 90 maps
    preds = _pass(gap_cnn, x, labels, keeper, batch_size=16)
    store.pass_inputs = keeper
    assert len(keeper) == 50 and sorted(i for i in range(N) if i in keeper) == _expected(preds.preds, labels, 3, 50)

    wanted = np.array([i for i in range(N) if i in keeper][:5] + [i for i in range(N) if i not in keeper][:4])
    wanted = wanted[[7, 0, 5, 1, 8, 2, 6, 3, 4]]   # held and not held interleaved
    held, maps = kept_maps(store, wanted)
    assert held.tolist() == [int(i) in keeper for i in wanted] and maps.shape == (5, 8, SIDE, SIDE)
    ref_logits, ref_maps = forward_with_activations(gap_cnn, engine.layer, x[torch.as_tensor(wanted)])
    np.testing.assert_allclose(maps, ref_maps[torch.as_tensor(held)].numpy(), atol=1e-6)

    forwarded = []
    handle = gap_cnn.register_forward_hook(lambda _m, inputs, _out: forwarded.append(len(inputs[0])))
    run = SimpleNamespace(cams=store, inputs=x, preds=preds, progress=False)
    try:
        acts, logits = _activations(run, engine, wanted)
    finally:
        handle.remove()
    assert forwarded == [4]   # only the images the budget did not hold
    np.testing.assert_allclose(acts, ref_maps.numpy(), atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-5)

    model = MlpHeadCNN().eval()   # the torch.fx tail path keeps the tail's inputs, not maps
    tail_engine = CamEngine(model, input_shape=(3, SIDE, SIDE), batch_size=32)
    tail_store = CamStore(lambda method, layer: tail_engine, x)
    tail_store.pass_inputs = PassInputs(tail_engine.layer, tail_engine.inference_keep, N)
    _pass(model, x, labels, tail_store.pass_inputs, batch_size=16)
    held, maps = kept_maps(tail_store, wanted)
    assert not held.any() and maps is None


def test_under_autocast_the_kept_values_are_float32_and_their_cams_still_equal_the_librarys():
    """A bfloat16 autocast pass (the CPU's mixed precision; CUDA's is float16) computes low-precision values at
    the layer; PassInputs keeps them as float32, on the fast path (maps) and the tail path (the tail's inputs),
    so the float32 tail and head can read them."""
    from helpers.steps.predictions import pass_inputs
    torch.manual_seed(0)
    gap_cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 6)).eval()
    model, x, labels = _model_and_data()
    for net in (gap_cnn, model):
        engine = CamEngine(net, input_shape=(3, SIDE, SIDE), batch_size=32)
        store = CamStore(lambda method, layer: engine, x)
        keeper = pass_inputs(store, N, seed=3)
        run_inference(net, x, labels, batch_size=16, progress=False, observers=[keeper], autocast_dtype=torch.bfloat16)
        store.pass_inputs = keeper
        held = [i for i in range(N) if i in keeper][:3]
        values = keeper.stack(held)
        assert len(keeper) == N and all(v.dtype == torch.float32 for v in (values if isinstance(values, tuple)
                                                                             else (values,)))
        got = store.get(held, [1, 2, 3])
        np.testing.assert_allclose(got, library_gradcam(net, engine.layer, x[torch.as_tensor(held)], [1, 2, 3]),
                                   atol=0.05)   # bfloat16 inputs to the layer: within a few % of the float32 maps
