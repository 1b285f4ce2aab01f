"""Measurement: per-example norms from hooks and pieces taken alone, against per-example gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from adabatch.measure import ExampleNorms, PieceNorms, Unsupported, example_denominators, linear_layers


def _per_example_sq(model: nn.Module, loss_one, x, y, den: dict | None = None) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: loss_one(functional_call(model, p, (xi[None],)), yi[None])),
             in_dims=(None, 0, 0))(params, x, y)
    out = torch.zeros(len(x))
    for k, v in g.items():
        v = v.reshape(len(x), -1)
        if den is not None:
            v = v / den[k].reshape(1, -1)
        out += v.square().sum(1)
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def test_hooked_per_example_norms_equal_the_per_example_gradients():
    model = _mlp()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    exact = _per_example_sq(model, nn.functional.cross_entropy, x, y)
    norms = ExampleNorms(linear_layers(model, list(model.parameters())))
    nn.functional.cross_entropy(model(x), y).backward()  # mean loss: delta_j is 1/10 of example j's
    norms.after_backward()
    mean_v, total = norms.finish(list(model.parameters())).tolist()
    assert mean_v * 10 ** 2 == pytest.approx(float(exact.mean()), rel=1e-5)
    assert total == pytest.approx(sum(float(p.grad.square().sum()) for p in model.parameters()), rel=1e-6)


def test_sequence_inputs_use_gram_matrices_and_stay_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    x, y = torch.randn(6, 9, 5), torch.randn(6, 9, 4)  # 9 positions per example
    loss_one = lambda out, yy: 0.5 * (out - yy).square().sum((1, 2)).mean()  # noqa: E731
    exact = _per_example_sq(model, loss_one, x, y)
    norms = ExampleNorms(linear_layers(model, list(model.parameters())))
    loss_one(model(x), y).backward()
    norms.after_backward()
    mean_v = norms.finish(list(model.parameters()))[0].item()
    assert mean_v * 6 ** 2 == pytest.approx(float(exact.mean()), rel=1e-5)


def test_adam_preconditioned_per_example_norms_equal_the_preconditioned_gradients():
    model = _mlp()
    params = list(model.parameters())
    den_t = [torch.rand_like(p) + 0.1 for p in params]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    exact = _per_example_sq(model, nn.functional.cross_entropy, x, y,
                            {k: d for (k, _), d in zip(model.named_parameters(), den_t)})
    layers = linear_layers(model, params)
    norms = ExampleNorms(layers, example_denominators(layers, params, den_t))
    nn.functional.cross_entropy(model(x), y).backward()
    norms.after_backward()
    mean_v = norms.finish(params, den_t)[0].item()
    assert mean_v * 8 ** 2 == pytest.approx(float(exact.mean()), rel=1e-5)


def test_a_layer_called_twice_is_reported_instead_of_measured_wrongly():
    lin = nn.Linear(4, 4)
    norms = ExampleNorms([lin])
    lin(lin(torch.randn(3, 4))).sum().backward()  # weight sharing: per-example norms do not add up
    norms.after_backward()
    with pytest.raises(Unsupported, match="exactly once"):
        norms.finish(list(lin.parameters()))
    assert not lin._forward_hooks, "hooks must be removed even when the measurement fails"


def test_models_with_parameters_outside_linear_layers_are_not_covered():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert linear_layers(model, list(model.parameters())) is None
    conv = nn.Conv1d(1, 2, 3)
    assert linear_layers(conv, list(conv.parameters())) is None


def test_pieces_taken_alone_sum_back_to_the_step_gradient():
    model = _mlp()
    params = list(model.parameters())
    xs, ys = torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))
    pieces = PieceNorms(params, groups=(2, 2))
    for i in range(4):
        pieces.before_backward(i)
        (nn.functional.cross_entropy(model(xs[i]), ys[i]) / 4).backward()
        pieces.after_backward(i)
    values = pieces.finish().tolist()
    accumulated = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    halves = []
    for part in (slice(0, 2), slice(2, 4)):
        sum(nn.functional.cross_entropy(model(x), y) / 4 for x, y in zip(xs[part], ys[part])).backward()
        halves.append(sum(float(p.grad.square().sum()) for p in params))
        for p in params:
            p.grad = None
    assert values[:2] == pytest.approx(halves, rel=1e-5)
    assert values[2] == pytest.approx(sum(float(g.square().sum()) for g in accumulated), rel=1e-6)
