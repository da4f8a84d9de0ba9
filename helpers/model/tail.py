"""Grad-CAM from the target layer onward: the model split with torch.fx at its target layer.

For a head that is not GAP -> Linear (a flatten + MLP head, VGG's classifier) or a transformer, Grad-CAM needs
the gradient of the target logit with respect to the target layer's output, which only the part of the model
after that layer determines. `split_at_layer` cuts the traced graph there:

- `head` (images -> kept values) is the graph up to the cut;
- `tail` (kept values -> (logits, target layer output)) is the rest, so a backward pass runs through it only.

The kept values are every value computed before the cut that the rest of the graph reads: the target layer's
output and, for a ViT block, the residual stream it also adds to. Where the target layer is a cheap leaf (a
LayerNorm) whose inputs are kept anyway, its output is recomputed in the tail instead of kept: that halves
what a ViT keeps per image. When every kept value is an input or the output of the target layer, a forward
hook on that layer captures them during the ordinary inference pass (`kept_from_call`), so the class
galleries' CAMs need no second pass through the model.

Nothing here guesses: the split is checked on a probe (tail(head(x)) and the hook's values equal what the
model computes) and refused with a reason otherwise; CamEngine then checks its CAMs against pytorch-grad-cam.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx
from pytorch_grad_cam.utils.image import scale_cam_image
from torch import nn

KeptValues = tuple[torch.Tensor, ...]
PROBE_TOLERANCE = 1e-5
BATCH = object()   # a value the tail reads that is the batch size


class _TargetLeafTracer(fx.Tracer):
    """torch.fx's tracer with the target layer kept as one call, so its output is one node of the graph."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self.layer or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class TailSplit:
    """A model cut at its target layer. `tail(*kept)` returns (logits, target layer output); `head(x)` returns
    the kept values; `sources[k]` says where kept value k appears in a call of the target layer: -1 its
    output, j >= 0 its positional input j; None when some kept value is neither (then only `head` gives them)."""
    head: fx.GraphModule
    tail: fx.GraphModule
    sources: Optional[tuple[int, ...]]
    recomputes_layer: bool     # the tail recomputes the target layer from its kept inputs

    @property
    def hook_keep(self) -> Optional[Callable[[tuple, object], Optional[KeptValues]]]:
        """kept_from_call where a forward hook on the target layer sees every kept value; else None."""
        return self.kept_from_call if self.sources is not None else None

    def kept_from_call(self, inputs: tuple, output) -> Optional[KeptValues]:
        """The kept values of one batch from a forward hook's (inputs, output) on the target layer."""
        if self.sources is None:
            return None
        values = tuple(output if s < 0 else inputs[s] for s in self.sources)
        return values if all(isinstance(v, torch.Tensor) for v in values) else None


def _layer_name(model: nn.Module, layer: nn.Module) -> Optional[str]:
    return next((name for name, m in model.named_modules() if m is layer), None)


def _trace(model: nn.Module, layer: nn.Module) -> fx.Graph:
    """The model's graph with the target layer as one call; extra forward arguments fixed at their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return _TargetLeafTracer(layer).trace(model, concrete_args=concrete or None)


def _input_dependent(graph: fx.Graph, sources: Sequence[fx.Node]) -> set:
    """The nodes whose value depends on `sources` (the images: the others are parameters, buffers, constants)."""
    dep: set = set()
    for node in graph.nodes:
        if node in sources or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _copy(graph: fx.Graph, nodes: Sequence[fx.Node], env: dict) -> None:
    """Copy `nodes` (in order) into `graph`, first copying any input-independent node they read (a parameter,
    a constant built from one) that `env` does not hold yet."""
    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            for a in n.all_input_nodes:
                lookup(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        return env[n]
    for node in nodes:
        for a in node.all_input_nodes:
            lookup(a)
        env[node] = graph.node_copy(node, lambda a: env[a])


def _shape_values(model: nn.Module, graph: fx.Graph, nodes: Sequence[fx.Node], input_shape) -> dict:
    """{node: BATCH or its constant} for those of `nodes` that are not tensors (a Swin block's B, H, W, C =
    x.shape, read again after the cut), from the graph run on probes of 2 and 3 images: a value that follows
    the batch size is the batch, one that stays is a constant; raises ValueError on any other."""
    wanted, seen = set(nodes), ({}, {})

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                self.record[n] = value
            return value
    module = fx.GraphModule(model, graph)
    for batch, record in zip((2, 3), seen):
        rec = Recorder(module)
        rec.record = record
        with torch.no_grad():
            rec.run(torch.randn((batch,) + tuple(int(s) for s in input_shape),
                                generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device))
    out = {}
    for n in nodes:
        two, three = seen[0].get(n), seen[1].get(n)
        if isinstance(two, torch.Tensor):
            continue
        if isinstance(two, int) and (two, three) == (2, 3):
            out[n] = BATCH
        elif type(two) in (int, float, bool, tuple) and two == three and not isinstance(two, torch.Size):
            out[n] = two
        else:
            raise ValueError(f"the tail reads {n.name}, neither a tensor, the batch size nor a constant")
    return out


def _build(model: nn.Module, graph: fx.Graph, layer: nn.Module, layer_name: str,
           input_shape: Sequence[int]) -> TailSplit:
    """The head and tail GraphModules of a traced graph (raises ValueError where the cut does not exist)."""
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == layer_name]
    if len(calls) != 1:
        raise ValueError(f"the target layer is called {len(calls)} times in the traced graph, not once")
    target = calls[0]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    # Arguments fixed by concrete_args stay as placeholders that feed only fx's guards on their value: drop both.
    guards = _input_dependent(graph, placeholders[1:])
    if not placeholders or any(u not in guards for g in guards for u in g.users):
        raise ValueError("the traced forward takes more than the images")
    nodes = [n for n in nodes if n not in guards]
    cut = nodes.index(target)
    after = [n for n in nodes[cut + 1:] if n.op != "output"]
    output = next(n for n in nodes if n.op == "output")
    dep = _input_dependent(graph, placeholders[:1])
    read_after = {a for n in after + [output] for a in n.all_input_nodes}
    crossing = [n for n in nodes[:cut + 1] if n in dep and n in read_after]
    if target not in crossing:
        raise ValueError("the model output does not depend on the target layer")
    layer_args = [a for a in target.all_input_nodes if a in dep]
    # A cheap leaf (LayerNorm) whose inputs cross anyway: recompute it in the tail rather than keep its output.
    recompute = not list(layer.children()) and bool(layer_args) and all(a in crossing for a in layer_args)
    shapes = _shape_values(model, graph, [n for n in crossing if n is not target], input_shape)
    kept = [n for n in crossing if not (recompute and n is target) and n not in shapes]
    if recompute:
        kept += [a for a in layer_args if a not in kept]

    head_graph, env = fx.Graph(), {}
    _copy(head_graph, [n for n in nodes[:cut + (0 if recompute else 1)]], env)
    head_graph.output(tuple(env[n] for n in kept))
    head = fx.GraphModule(model, head_graph)
    head.graph.eliminate_dead_code()   # what only the tail reads (a ViT's shape lookups) need not run twice
    head.recompile()

    tail_graph, env = fx.Graph(), {}
    for k, n in enumerate(kept):
        env[n] = tail_graph.placeholder(f"kept_{k}")
    for n, value in shapes.items():   # the batch size from a kept tensor; constants as they are
        env[n] = tail_graph.call_method("size", (env[kept[0]], 0)) if value is BATCH else value
    _copy(tail_graph, ([target] if recompute else []) + after, env)
    tail_graph.output((env[output.args[0]] if isinstance(output.args[0], fx.Node) else output.args[0], env[target]))

    positions = {a: j for j, a in enumerate(target.args) if isinstance(a, fx.Node)}
    sources = tuple(-1 if n is target else positions.get(n) for n in kept)
    return TailSplit(head=head, tail=fx.GraphModule(model, tail_graph),
                     sources=None if any(s is None for s in sources) else sources, recomputes_layer=recompute)


def _check_on_probe(model: nn.Module, layer: nn.Module, split: TailSplit, x: torch.Tensor) -> tuple[str, bool]:
    """("", hook_ok) when tail(head(x)) gives what the model computes on x; else (why not, False). hook_ok:
    a forward hook on the target layer sees the same kept values as the traced head."""
    seen: dict = {}
    handle = layer.register_forward_hook(lambda _m, inputs, out: seen.update(inputs=inputs, output=out))
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        kept = split.head(x)
        logits, activation = split.tail(*kept)
    if not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == len(x) for v in kept):
        return "the values the tail needs are not per-image tensors", False
    if not (isinstance(expected, torch.Tensor) and _close(logits, expected)):
        return "the traced graph's output differs from the model's on a probe", False
    if not _close(activation, seen.get("output")):
        return "the traced target layer output differs from the model's on a probe", False
    inputs = [v.detach().clone().requires_grad_(v.is_floating_point()) for v in kept]
    with torch.enable_grad():   # raises where the tail cannot run backward (an in-place op on a kept value)
        logits, activation = split.tail(*inputs)
        torch.autograd.grad(logits[:, 0].sum(), activation)
    hooked = split.kept_from_call(seen["inputs"], seen["output"])
    return "", hooked is not None and all(_close(h, k) for h, k in zip(hooked, kept))


def _close(a: torch.Tensor, b) -> bool:
    return (isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.float(), b.float(), rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE))


def split_at_layer(model: nn.Module, layer: nn.Module, input_shape: Sequence[int],
                   dtype: torch.dtype = torch.float32,
                   like: Optional[TailSplit] = None) -> tuple[Optional[TailSplit], str]:
    """(the model cut at `layer`, "") or (None, why not): torch.fx could not trace it, the cut does not
    exist, or the traced graph does not compute what the model computes on a random probe of two images.
    `dtype`: the weights' (the tail runs float32 only: the library reads low-precision gradients as float32).
    `like`: the split of another instance of this architecture at the same layer, re-rooted instead of traced."""
    if dtype != torch.float32:
        return None, f"it runs float32 weights only, not {dtype}"
    if like is not None:
        return rerooted(like, model), ""
    name = _layer_name(model, layer)
    if name is None:
        return None, "the target layer is not a submodule of the model"
    was_training = model.training
    model.eval()
    try:
        split = _build(model, _trace(model, layer), layer, name, input_shape)
        for batch in (2, 3):   # a tail that reads the batch size must hold at another batch size too
            x = torch.randn((batch,) + tuple(int(s) for s in input_shape), generator=torch.Generator().manual_seed(0))
            why, hook_ok = _check_on_probe(model, layer, split, x.to(next(model.parameters()).device))
            if why:
                break
    except Exception as exc:  # torch.fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        return None, f"the torch.fx split failed ({type(exc).__name__}: {first})"
    finally:
        model.train(was_training)
    if why:
        return None, why
    # Where the hook sees other values than the traced head, images get them from a forward of the head.
    return (split if hook_ok else TailSplit(split.head, split.tail, None, split.recomputes_layer)), ""


def rerooted(split: TailSplit, model: nn.Module) -> TailSplit:
    """`split` for another instance of the same architecture (a copy with re-initialised weights): its graphs,
    copied, read the modules of `model`. Warm, tracing and checking a split took 0.36 s on ViT-Ti and 1.20 s on
    Swin-T; re-rooting 0.017 and 0.035 s."""
    graphs = (copy.deepcopy(split.head.graph), copy.deepcopy(split.tail.graph))
    return dataclasses.replace(split, head=fx.GraphModule(model, graphs[0]), tail=fx.GraphModule(model, graphs[1]))


def gradcam_from_tail(split: TailSplit, kept: KeptValues, targets, out_size: tuple[int, int],
                      reshape_transform: Optional[Callable] = None) -> np.ndarray:
    """Grad-CAM (N, H, W) from the kept values of N images, running only the tail with autograd: the gradient
    of logit targets[i] with respect to the target layer's output, reshaped as pytorch-grad-cam reshapes it
    (a ViT's tokens to a map), weights = spatial mean of the gradients, ReLU of the weighted sum of the
    activations, resized and min-max normalised with the library's own functions, in its order. `targets`: a
    class per image, or a callable that takes the logits (a detached NumPy copy) and returns one pytorch-grad-cam
    target per image (FinerCAM's weighted differences), scored as BaseCAM scores them."""
    # clone(): values kept under inference_mode cannot enter autograd as they are.
    inputs = [v.detach().clone().requires_grad_(v.is_floating_point()) for v in kept]
    with torch.enable_grad():
        logits, activation = split.tail(*inputs)
        if callable(targets):
            score = sum(target(z) for target, z in zip(targets(logits.detach().float().cpu().numpy()), logits))
        else:
            t = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=logits.device)
            score = logits[torch.arange(len(t), device=logits.device), t].sum()
        (grads,) = torch.autograd.grad(score, activation)
    activation = activation.detach()
    if reshape_transform is not None:
        activation, grads = reshape_transform(activation), reshape_transform(grads)
    acts, grads = activation.cpu().numpy(), grads.cpu().numpy()
    if acts.ndim != 4:
        raise ValueError(f"Grad-CAM needs (N, K, h, w) maps at the target layer; got {acts.shape}")
    weights = np.mean(grads, axis=(2, 3))                      # GradCAM.get_cam_weights
    cam = np.maximum((weights[:, :, None, None] * acts).sum(axis=1), 0)   # BaseCAM.get_cam_image, then ReLU
    height, width = out_size
    scaled = np.maximum(scale_cam_image(cam, (int(width), int(height))), 0)   # compute_cam_per_layer
    return scale_cam_image(scaled).astype(np.float32)          # aggregate_multi_layers (one layer)


def layer_values(split: TailSplit, kept: KeptValues, true=None, pred=None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(target-layer output, ∂(z_pred − z_true)/∂output or None, logits) of the images whose kept values these
    are, through the tail only: what a forward (and backward) through the whole model gives at that layer."""
    if true is None:
        with torch.no_grad():
            logits, activation = split.tail(*kept)
        return activation, None, logits
    inputs = [v.detach().clone().requires_grad_(v.is_floating_point()) for v in kept]
    with torch.enable_grad():
        logits, activation = split.tail(*inputs)
        n = torch.arange(len(logits), device=logits.device)
        t, p = (torch.as_tensor(np.asarray(c, dtype=np.int64), device=logits.device) for c in (true, pred))
        (grad,) = torch.autograd.grad((logits[n, p] - logits[n, t]).sum(), activation)
    return activation.detach(), grad, logits.detach()


def layer_arrays(split: TailSplit, kept: KeptValues, reshape_transform: Optional[Callable] = None, true=None,
                 pred=None) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """layer_values as float32 arrays, a token layer's output and gradient reshaped to (n, C, h, w)."""
    act, grad, logits = layer_values(split, kept, true, pred)
    if reshape_transform is not None:
        act = reshape_transform(act)
        grad = None if grad is None else reshape_transform(grad)
    return (act.float().cpu().numpy(), None if grad is None else grad.float().cpu().numpy(),
            logits.float().cpu().numpy())


def head_values(split: TailSplit, x: torch.Tensor) -> KeptValues:
    """The kept values of images x from a forward of the head part only (no autograd)."""
    with torch.no_grad():
        return tuple(split.head(x))


def gradcam_in_batches(split: TailSplit, kept: Union[torch.Tensor, KeptValues], targets, out_size: tuple[int, int],
                       reshape_transform: Optional[Callable], batch_size: int, device) -> np.ndarray:
    """gradcam_from_tail over kept values of many images (a tuple of tensors, or one), `batch_size` images at
    a time on `device` (what autograd holds is one batch's tail)."""
    values = kept if isinstance(kept, tuple) else (kept,)
    n = values[0].shape[0]
    out = np.zeros((n,) + tuple(out_size), np.float32)
    for s in range(0, n, batch_size):
        piece = tuple(v[s:s + batch_size].to(device) for v in values)
        out[s:s + batch_size] = gradcam_from_tail(split, piece, targets[s:s + batch_size], out_size, reshape_transform)
    return out


def gradcam_from_images(split: TailSplit, x: torch.Tensor, targets, reshape_transform: Optional[Callable]) -> np.ndarray:
    """Grad-CAM of images x (on the model's device) from a forward of the head part, then the tail."""
    return gradcam_from_tail(split, head_values(split, x), targets, tuple(x.shape[-2:]), reshape_transform)
