"""The noise measurement of one step: per-example norms, or pieces of the step taken alone; and the total.

Two ways to measure, both ending in the squared norms of mean gradients over b samples and of the
step's total, which :func:`adabatch.noise.step_estimates` turns into unbiased |G|^2 and tr(Sigma):

**Per-example norms** (:class:`ExampleNorms`, b = 1), when every trainable parameter sits in a
``torch.nn.Linear``, ``Conv1d`` or ``Conv2d`` layer (Gray et al., NeurIPS 2024, "Normalization layer
per-example gradients are sufficient to predict gradient noise scale in transformers"; Goodfellow
2015 for the identity).
For a layer y = W a + c, example j's gradient is delta_j a_j^T (and delta_j for the bias), delta_j
the gradient of its loss with respect to y_j, so |g_j|^2 = |delta_j|^2 (|a_j|^2 + 1) with no
per-example gradient ever formed: two forward/backward hooks per layer read a_j and delta_j on
measured steps only. With a sequence dimension (y_t = W a_t + c), the gradient is
sum_t delta_t a_t^T and its squared norm sum_{t,s} (delta_t . delta_s)(a_t . a_s), from two Gram
matrices ("ghost" norms, Li et al. 2022), or from the per-example gradient itself where that is
the smaller product (T^2 (I + O) against T I O for I inputs and O outputs, the choice of Bu et al.
2023, "mixed ghost clipping"). A convolution is the same sum over its output positions, with a_t
the input patch under the kernel at position t (``F.unfold``; Conv1d and Conv2d with one group and
zero padding). Under Adam's preconditioner P the weight term is (delta_j^2)^T P^2 (a_j^2), one
extra product per layer, for 2-D inputs; with positions, it is |P (sum_t delta_t a_t^T)|^2 from the
per-example gradient. Patches and per-example gradients are formed from the inputs autograd keeps
anyway, in the backward hook, a few examples at a time (at most ``MAX_BLOCK`` numbers at once), on
measured steps only, for at most ``MAX_EXAMPLES`` examples of a micro-batch (every k-th, the sum
scaled up: an unbiased estimate, and a product no larger than a forward pass of 256 examples
whatever the micro-batch). They cost about a forward pass of the layer, so they are formed only when
asked for (``per_example=True``, the controller's ``measurement="examples"``); otherwise only the
cheap forms are taken (row norms, and Gram matrices of sequences up to ``MAX_GHOST_LENGTH``
positions without Adam's preconditioner), and anything else is :class:`Unsupported`, which the
controller measures with pieces. A measured step keeps its
micro-batches as planned: nothing is split. This is the cheaper and richer measurement: on the
5.3M-parameter MLP it costs about 5 ms on an 86 ms step where splitting the step costs about 30 ms,
and tr(Sigma) gets B - 1 degrees of freedom instead of one per piece.

**Pieces** (:class:`PieceNorms`), for every other model. A measured step's micro-batches are grouped into pieces (:class:`~adabatch.plan.StepPlan`,
``groups``). :class:`PieceNorms` reads each piece's gradient alone from ``.grad`` without a hook:
the first piece accumulates as usual; before each later piece the running sum is set aside (a
reference swap, no copy), autograd writes that piece into fresh ``.grad`` tensors, their norm is
taken and the sum added back. At the step, the norm of the whole sum is taken. With two pieces, a
measured step costs three norm passes and one addition over the gradients, and nothing is read
back until the step. Micro-batches after the last piece (under DDP, the final one, whose all-reduce
must see the whole sum) accumulate in place.

The controller scales micro-batch i's mean loss by n_i / P (P the samples the step planned), so a
piece of b samples holds (b / P) G_b and the sum holds (N / P) G_N: :func:`mean_gradient_norms`
undoes that (and a GradScaler's scale) to give the squared norms of mean gradients that
:func:`adabatch.noise.step_estimates` takes.

Example:
    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> cap = PieceNorms(list(lin.parameters()), groups=(1, 2))
    >>> for i, x in enumerate(([[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 0.0]])):
    ...     cap.before_backward(i); lin(torch.tensor(x)).sum().backward(); cap.after_backward(i)
    >>> [round(v, 4) for v in cap.finish().tolist()], lin.weight.grad.tolist()
    ([1.0, 13.0, 20.0], [[4.0, 2.0]])
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch.gradnorm import squared_norm

# Most numbers formed at once for one layer's patches, Gram matrices or per-example gradients
# (16 MiB in float32): examples are taken a block at a time.
MAX_BLOCK = 1 << 22
# Longest sequence whose per-example norms are taken from Gram matrices (T x T per example) unless
# per-example gradients are asked for.
MAX_GHOST_LENGTH = 512
# Most examples of one micro-batch whose norms take a product the size of the layer's own (Adam's
# preconditioner, positions, convolutions): a larger micro-batch is sampled every k-th example and
# the sum scaled by n / m, an unbiased estimate of the whole micro-batch's (examples of a shuffled
# batch are exchangeable). Row norms of plain Linear layers are cheap and always take every example.
MAX_EXAMPLES = 256
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)


class PieceNorms:
    """Squared norms of each piece of one step taken alone, then of the whole sum.

    Call :meth:`before_backward` and :meth:`after_backward` around micro-batch ``i`` of the step
    (0-based), then :meth:`finish` once at the step; it returns one float32 tensor
    ``[|piece_1|^2, ..., |piece_n|^2, |sum|^2]`` in the units of ``.grad`` (read it back once).
    """

    def __init__(self, params: Sequence[Tensor], groups: Sequence[int],
                 denominators: Sequence[Tensor] | None = None) -> None:
        self.params = params
        self.denominators = denominators
        self._first: dict[int, int] = {}  # micro-batch index -> piece starting there
        self._last: dict[int, int] = {}  # micro-batch index -> piece ending there
        at = 0
        for piece, size in enumerate(groups):
            self._first[at] = piece
            self._last[at + size - 1] = piece
            at += size
        self.pieces: list[Tensor] = []
        self._aside: list[Tensor | None] | None = None

    def before_backward(self, i: int) -> None:
        piece = self._first.get(i)
        if piece:  # a later piece starts: set the running sum aside, autograd fills fresh .grad tensors
            self._aside = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None

    def after_backward(self, i: int) -> None:
        piece = self._last.get(i)
        if piece is None:
            return
        self.pieces.append(squared_norm(self.params, self.denominators))
        aside, self._aside = self._aside, None
        if aside is None:
            return
        fresh = [p.grad for p in self.params]
        pairs = [(s, g) for s, g in zip(aside, fresh) if s is not None and g is not None]
        if any(s.is_sparse or g.is_sparse for s, g in pairs):
            for s, g in pairs:
                s.add_(g)
        elif pairs:
            torch._foreach_add_([s for s, _ in pairs], [g for _, g in pairs])
        for p, s, g in zip(self.params, aside, fresh):
            p.grad = s if s is not None else g

    def abandon(self) -> None:
        """Put a set-aside sum back (a step dropped mid-way, e.g. by an out-of-memory error)."""
        if getattr(self, "_aside", None) is not None:
            for p, s in zip(self.params, self._aside):
                if s is not None:
                    p.grad = s if p.grad is None else p.grad.add_(s)
            self._aside = None

    def finish(self) -> Tensor:
        return torch.stack(self.pieces + [squared_norm(self.params, self.denominators)])


def mean_gradient_norms(values: Sequence[float], piece_sizes: Sequence[int], step_samples: int, planned: int,
                        loss_scale: float = 1.0) -> tuple[list[float], float]:
    """(|G_b|^2 of each piece, |G_N|^2 of the step) from :meth:`PieceNorms.finish`'s values.

    A piece of b samples held (b / P) G_b and the sum (N / P) G_N, all times ``loss_scale``.

    Example:
        >>> mean_gradient_norms([1.0, 1.0, 4.0], [16, 16], 32, 32)
        ([4.0, 4.0], 4.0)
    """
    s2 = loss_scale * loss_scale
    pieces = [v * (planned / b) ** 2 / s2 for v, b in zip(values[:-1], piece_sizes)]
    return pieces, values[-1] * (planned / step_samples) ** 2 / s2


def _row_sq(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1).square()


def example_layers(model: nn.Module, params: Sequence[Tensor], convolutions: bool = False) -> list[nn.Module] | None:
    """The Linear layers (and with ``convolutions``, the Conv1d / Conv2d layers) holding every
    trainable parameter in ``params``, or None if any is elsewhere (or in a convolution per-example
    norms cannot follow: grouped, or padded otherwise than with zeros).

    Example:
        >>> cnn = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> len(example_layers(cnn, list(cnn.parameters()), convolutions=True))
        2
        >>> example_layers(cnn, list(cnn.parameters())) is None
        True
        >>> example_layers(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), list(nn.Linear(1, 1).parameters()))
    """
    owner: dict[int, nn.Module] = {}
    layers: list[nn.Module] = []
    for module in model.modules():
        # exact classes: subclasses may not call the module's forward (attention's out_proj)
        kind = _plain_type(module)
        if kind is nn.Linear or (convolutions and kind in CONVOLUTIONS and _conv_geometry(module) is not False):
            layers.append(module)
            for p in module.parameters(recurse=False):
                owner[id(p)] = module
    if not all(id(p) in owner for p in params):
        return None
    used = {id(owner[id(p)]) for p in params}
    return [m for m in layers if id(m) in used]


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules runs compiled (``torch.compile(m)`` or ``m.compile()``).

    A compiled forward runs a captured graph: forward hooks registered on its layers afterwards (as
    :class:`ExampleNorms` does on measured steps) are not called once per micro-batch, so per-example
    norms cannot be read there, and every registration would make the graph recompile.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> compiled(net), compiled(torch.compile(net, backend="eager"))
        (False, True)
    """
    return any(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, ...], ...] | None | bool:
    """(kernel, dilation, padding, stride) of a convolution ``F.unfold`` can follow, False for one it
    cannot, None for a Linear layer."""
    if not isinstance(module, CONVOLUTIONS):
        return None
    if module.groups != 1 or module.padding_mode != "zeros":
        return False
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    padding = module.padding
    if isinstance(padding, str):  # "valid" or "same" (odd effective kernels only: even ones pad unevenly)
        if padding == "valid":
            padding = (0,) * len(kernel)
        elif all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel)):
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
        else:
            return False
    if len(kernel) == 1:  # Conv1d runs as a Conv2d of height 1
        return (1, kernel[0]), (1, dilation[0]), (0, padding[0]), (1, stride[0])
    return tuple(kernel), tuple(dilation), tuple(padding), tuple(stride)


def _patches(x: Tensor, geometry: tuple[tuple[int, ...], ...]) -> Tensor:
    """(n, T, C k) input patches of a convolution's input ``x`` (n, C, L) or (n, C, H, W)."""
    kernel, dilation, padding, stride = geometry
    if x.dim() == 3:
        x = x.unsqueeze(2)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


def _plain_type(module: nn.Module) -> type:
    """The module's own class, seen through FSDP2's wrapper class (``FSDPLinear`` is a Linear).

    ``fully_shard`` swaps a module's class for ``FSDP<name>(FSDPModule, <class>)``; the layer still
    runs its class's forward on full (all-gathered) weights and the local batch, so per-example
    norms read from its activations are those of this rank's examples, as under DDP.
    """
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        return bases[1]
    return cls


class Unsupported(RuntimeError):
    """A layer was called in a way per-example norms cannot follow (twice per forward, odd shapes)."""


class ExampleNorms:
    """Per-example squared gradient norms of one measured step (see the module docstring).

    Hooks are registered on construction and removed by :meth:`close` (or :meth:`finish`). After
    every micro-batch's backward call :meth:`after_backward`; :meth:`finish` returns one float32
    tensor ``[mean_j v_j, |sum|^2]`` with v_j = |delta_j|^2 (|a_j|^2 + 1) summed over layers (in
    the units of the scaled loss, like :class:`PieceNorms`; only the mean over examples is formed,
    one dot product per layer). Raises :class:`Unsupported` when a
    layer was not called exactly once per micro-batch with a supported input.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> norms = ExampleNorms([lin])
        >>> lin(x).sum().backward(); norms.after_backward()
        >>> [round(v, 4) for v in norms.finish(list(lin.parameters())).tolist()]  # (1 + 1 + 4 + 1) / 2, |(1,2,2)|^2
        [3.5, 9.0]
    """

    def __init__(self, layers: Sequence[nn.Module], denominators: dict[int, tuple[Tensor, Tensor | None]] | None = None,
                 per_example: bool = False) -> None:
        self.layers = layers
        self.per_example = per_example  # whether per-example gradients and patches may be formed
        # id(layer) -> (its unfold geometry, the input's dimensions) for convolutions
        self._conv = {id(m): (_conv_geometry(m), 3 if isinstance(m, nn.Conv1d) else 4)
                      for m in layers if isinstance(m, CONVOLUTIONS)}
        self.denominators = denominators  # id(layer) -> (P_W^2 as 1 / d^2, P_b^2 or None) under Adam
        self._parts: list[Tensor] = []  # per-layer (n,) contributions of the micro-batch in progress
        self._calls: dict[int, int] = {}
        self._grads = 0
        self._sum: Tensor | None = None  # sum over the step's examples of v_j
        self._count = 0
        self._examples = 0  # examples in the micro-batch in progress
        self.error: str | None = None
        self.suspended = False  # set inside controller.paused(): forwards there are not the step's
        self._handles = [layer.register_forward_hook(self._forward) for layer in layers]

    def _forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        if self.suspended or not torch.is_grad_enabled() or not isinstance(output, Tensor) \
                or not output.requires_grad:
            return  # an evaluation between micro-batches (or under no_grad) is not part of the step
        key = id(module)
        self._calls[key] = self._calls.get(key, 0) + 1
        a = inputs[0] if inputs else None
        if self.error is not None or not isinstance(a, Tensor):
            if self.error is None:
                self.error = f"{type(module).__name__} called without a tensor input"
            return
        conv = self._conv.get(key)
        if conv is not None and a.dim() != conv[1]:
            self.error = f"{type(module).__name__} saw input {tuple(a.shape)}: unbatched inputs have no examples"
            return
        if not self.per_example and (conv is not None or (a.dim() > 2 and (
                self.denominators is not None or math.prod(a.shape[1:-1]) > MAX_GHOST_LENGTH))):
            self.error = (f"{type(module).__name__} saw input {tuple(a.shape)}: its per-example norms need per-example "
                          "gradients (measurement='examples' forms them)")
            return
        self._examples = a.shape[0]
        bias = module.bias is not None
        if conv is None and a.dim() == 2 and self.denominators is None:
            # only |a_j|^2 (+ 1 for the bias) is needed: take it now and let the activation go
            a_sq = _row_sq(a.detach())
            if bias:
                a_sq = a_sq + 1.0
            output.register_hook(lambda g, a_sq=a_sq: self._dense(g, a_sq))
            return
        den = None if self.denominators is None else self.denominators[key]
        geometry = None if conv is None else conv[0]
        stride = -(-a.shape[0] // MAX_EXAMPLES)  # every stride-th example: at most MAX_EXAMPLES of them
        sampled = a.detach()[::stride]
        scale = a.shape[0] / sampled.shape[0]
        output.register_hook(lambda g, a=sampled, bias=bias, den=den, geometry=geometry, stride=stride, scale=scale:
                             self._backward(g[::stride], a, bias, den, geometry, scale))

    def _dense(self, g: Tensor, a_sq: Tensor) -> None:
        """Sum over the micro-batch's examples of |delta_j|^2 (|a_j|^2 + 1): one dot product."""
        self._grads += 1
        self._parts.append(torch.dot(_row_sq(g.detach()), a_sq))

    def _backward(self, g: Tensor, a: Tensor, bias: bool, den: tuple[Tensor, Tensor | None] | None,
                  geometry: tuple[tuple[int, ...], ...] | None, scale: float = 1.0) -> None:
        """The same sum for a preconditioned layer, one with positions, or a convolution, over the
        examples in ``g`` and ``a`` (a sample of the micro-batch's), times ``scale`` (n / sampled)."""
        self._grads += 1
        g = g.detach().float()
        a = a.float()
        if geometry is None and a.dim() == 2:
            pw2, pb2 = den
            v = (g.square() @ pw2 * a.square()).sum()
            if pb2 is not None:
                v = v + (g.square().sum(0) * pb2).sum()
            self._parts.append(v * scale if scale != 1.0 else v)
            return
        n = a.shape[0]
        if geometry is None:  # positions: the flattened middle dimensions
            a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
            inputs = a3.shape[-1]
        else:  # output positions of a convolution; its patches are unfolded block by block below
            a3, g3 = None, g.reshape(n, g.shape[1], -1).transpose(1, 2)
            inputs = a.shape[1] * math.prod(geometry[0])
        positions, outputs = g3.shape[1], g3.shape[2]
        # Gram matrices (T x T) or the per-example gradient (O x I), whichever is smaller; Adam's
        # preconditioner weighs the gradient's entries, so it needs the gradient itself
        ghost = den is None and (not self.per_example or positions * (inputs + outputs) <= inputs * outputs)
        size = max(positions * positions if ghost else inputs * outputs, positions * inputs)
        block = max(1, MAX_BLOCK // size)
        v = g.new_zeros(())
        for start in range(0, n, block):
            gb = g3[start:start + block]
            ab = a3[start:start + block] if a3 is not None else _patches(a[start:start + block], geometry)
            if ghost:
                v = v + (torch.bmm(ab, ab.transpose(1, 2)) * torch.bmm(gb, gb.transpose(1, 2))).sum()
            else:
                per_example = torch.bmm(gb.transpose(1, 2), ab).square()  # (examples, O, I)
                v = v + (per_example if den is None else per_example * den[0]).sum()
        if bias:
            b2 = g3.sum(1).square()  # (n, O): each example's bias gradient, squared
            v = v + (b2 if den is None or den[1] is None else b2 * den[1]).sum()
        self._parts.append(v * scale if scale != 1.0 else v)

    def before_backward(self, i: int) -> None:
        """Nothing to do: the hooks read what they need (for symmetry with :class:`PieceNorms`)."""

    def after_backward(self, i: int = 0) -> None:
        """Fold the micro-batch just backpropagated into the step's sum."""
        if self.error is None and (any(self._calls.get(id(m), 0) != 1 for m in self.layers)
                                   or self._grads != len(self.layers)):
            self.error = "a layer was not called exactly once per micro-batch (shared, skipped or recomputed)"
        if self.error is None and self._parts:
            total = torch.stack(self._parts).sum()  # one part per layer, each summed over the examples
            self._sum = total if self._sum is None else self._sum + total
            self._count += self._examples
        self._parts, self._calls, self._grads = [], {}, 0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    abandon = close  # a step dropped mid-way: nothing was set aside, only the hooks go

    def finish(self, params: Sequence[Tensor], denominators: Sequence[Tensor] | None = None) -> Tensor:
        self.close()
        if self.error is not None or self._sum is None:
            raise Unsupported(self.error or "no micro-batch was measured")
        return torch.stack([self._sum / self._count, squared_norm(params, denominators)])


def example_denominators(layers: Sequence[nn.Module], params: Sequence[Tensor],
                         denominators: Sequence[Tensor]) -> dict[int, tuple[Tensor, Tensor | None]]:
    """Per layer (P_W^2, P_b^2) from Adam's denominators d (P = 1 / d), for :class:`ExampleNorms`."""
    # a sharded layer (FSDP2) needs its whole preconditioner: one all-gather per tensor, on measured steps only
    by_param = {id(p): d.full_tensor() if hasattr(d, "full_tensor") else d for p, d in zip(params, denominators)}
    out = {}
    for layer in layers:
        # (out, in), like a Linear's W; a convolution's (out, in, *kernel) flattened as its patches are
        pw2 = by_param[id(layer.weight)].float().reciprocal().square().reshape(layer.weight.shape[0], -1)
        pb2 = None if layer.bias is None else by_param[id(layer.bias)].float().reciprocal().square()
        out[id(layer)] = (pw2, pb2)
    return out
