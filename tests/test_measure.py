"""Measurement: per-example norms from hooks and pieces taken alone, against per-example gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from adabatch.measure import ExampleNorms, PieceNorms, Unsupported, example_denominators, example_layers


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
    norms = ExampleNorms(example_layers(model, list(model.parameters())))
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
    norms = ExampleNorms(example_layers(model, list(model.parameters())))
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
    layers = example_layers(model, params)
    norms = ExampleNorms(layers, example_denominators(layers, params, den_t))
    nn.functional.cross_entropy(model(x), y).backward()
    norms.after_backward()
    mean_v = norms.finish(params, den_t)[0].item()
    assert mean_v * 8 ** 2 == pytest.approx(float(exact.mean()), rel=1e-5)


def _cnn(conv: type, **kw) -> nn.Module:
    torch.manual_seed(2)
    if conv is nn.Conv1d:
        return nn.Sequential(conv(2, 5, 3, **kw), nn.ReLU(), conv(5, 4, 3, stride=2, padding=1, bias=False),
                             nn.Flatten(), nn.LazyLinear(3))
    return nn.Sequential(conv(2, 5, 3, **kw), nn.ReLU(), conv(5, 4, (3, 2), stride=2, dilation=(1, 2)),
                         nn.Flatten(), nn.LazyLinear(3))


@pytest.mark.parametrize("conv, shape, kw", [
    (nn.Conv1d, (2, 17), {"padding": 1}),
    (nn.Conv1d, (2, 17), {"padding": "same", "dilation": 2}),
    (nn.Conv2d, (2, 9, 11), {"padding": 1}),
])
@pytest.mark.parametrize("adam", [False, True])
def test_convolutions_give_the_per_example_gradient_norms_too(conv, shape, kw, adam):
    model = _cnn(conv, **kw)
    x, y = torch.randn(7, *shape), torch.randint(0, 3, (7,))
    model(x)  # materialize the lazy layer
    params = list(model.parameters())
    assert example_layers(model, params) is None  # convolutions only when asked for
    layers = example_layers(model, params, convolutions=True)
    assert layers is not None and len(layers) == 3
    den_t = [torch.rand_like(p) + 0.1 for p in params] if adam else None
    exact = _per_example_sq(model, nn.functional.cross_entropy, x, y,
                            {k: d for (k, _), d in zip(model.named_parameters(), den_t)} if adam else None)
    norms = ExampleNorms(layers, example_denominators(layers, params, den_t) if adam else None, per_example=True)
    nn.functional.cross_entropy(model(x), y).backward()
    norms.after_backward()
    mean_v = norms.finish(params, den_t)[0].item()
    assert mean_v * 7 ** 2 == pytest.approx(float(exact.mean()), rel=1e-4)


def test_blocks_of_examples_add_up_to_the_whole(monkeypatch):
    import adabatch.measure as measure

    model = _cnn(nn.Conv1d, padding=1)
    x, y = torch.randn(9, 2, 17), torch.randint(0, 3, (9,))
    model(x)
    layers = example_layers(model, list(model.parameters()), convolutions=True)
    values = []
    for block in (1 << 22, 40):  # everything at once, then a couple of examples at a time
        monkeypatch.setattr(measure, "MAX_BLOCK", block)
        model.zero_grad()
        norms = ExampleNorms(layers, per_example=True)
        nn.functional.cross_entropy(model(x), y).backward()
        norms.after_backward()
        values.append(norms.finish(list(model.parameters()))[0].item())
    assert values[1] == pytest.approx(values[0], rel=1e-5)


def test_convolutions_per_example_norms_cannot_follow_are_left_to_pieces():
    for conv in (nn.Conv1d(4, 4, 3, groups=2), nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
                 nn.Conv1d(2, 2, 4, padding="same")):
        assert example_layers(conv, list(conv.parameters()), convolutions=True) is None
    conv = nn.Conv1d(2, 3, 3)
    norms = ExampleNorms(example_layers(conv, list(conv.parameters()), convolutions=True), per_example=True)
    conv(torch.randn(2, 8)).sum().backward()  # an unbatched input: no examples to take norms of
    norms.after_backward()
    with pytest.raises(Unsupported, match="unbatched"):
        norms.finish(list(conv.parameters()))


def test_sequences_under_adam_get_exact_norms_from_per_example_gradients_only_when_asked_for():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    params = list(model.parameters())
    den_t = [torch.rand_like(p) + 0.1 for p in params]
    x, y = torch.randn(6, 9, 5), torch.randn(6, 9, 4)
    loss_one = lambda out, yy: 0.5 * (out - yy).square().sum((1, 2)).mean()  # noqa: E731
    exact = _per_example_sq(model, loss_one, x, y, {k: d for (k, _), d in zip(model.named_parameters(), den_t)})
    layers = example_layers(model, params)
    for per_example in (False, True):
        model.zero_grad()
        norms = ExampleNorms(layers, example_denominators(layers, params, den_t), per_example=per_example)
        loss_one(model(x), y).backward()
        norms.after_backward()
        if not per_example:  # the cheap forms cannot weigh a sequence's gradient entries: left to pieces
            with pytest.raises(Unsupported, match="per-example gradients"):
                norms.finish(params, den_t)
            continue
        assert norms.finish(params, den_t)[0].item() * 6 ** 2 == pytest.approx(float(exact.mean()), rel=1e-5)


def test_without_per_example_gradients_convolutions_and_long_sequences_are_left_to_pieces(monkeypatch):
    import adabatch.measure as measure

    conv = nn.Conv1d(2, 3, 3)
    norms = ExampleNorms([conv])
    conv(torch.randn(4, 2, 8)).sum().backward()
    norms.after_backward()
    with pytest.raises(Unsupported, match="per-example gradients"):
        norms.finish(list(conv.parameters()))
    monkeypatch.setattr(measure, "MAX_GHOST_LENGTH", 4)
    lin = nn.Linear(3, 2)
    norms = ExampleNorms([lin])
    lin(torch.randn(2, 5, 3)).sum().backward()  # 5 positions, above the (lowered) limit
    norms.after_backward()
    with pytest.raises(Unsupported, match="per-example gradients"):
        norms.finish(list(lin.parameters()))


def test_a_layer_called_twice_is_reported_instead_of_measured_wrongly():
    lin = nn.Linear(4, 4)
    norms = ExampleNorms([lin])
    lin(lin(torch.randn(3, 4))).sum().backward()  # weight sharing: per-example norms do not add up
    norms.after_backward()
    with pytest.raises(Unsupported, match="exactly once"):
        norms.finish(list(lin.parameters()))
    assert not lin._forward_hooks, "hooks must be removed even when the measurement fails"


def test_models_with_parameters_outside_supported_layers_are_not_covered():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert example_layers(model, list(model.parameters())) is None
    emb = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2))
    assert example_layers(emb, list(emb.parameters())) is None


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


@pytest.mark.parametrize("adam", [False, True])
def test_large_micro_batches_take_the_costly_forms_over_every_kth_example(monkeypatch, adam):
    import adabatch.measure as measure

    monkeypatch.setattr(measure, "MAX_EXAMPLES", 4)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
    params = list(model.parameters())
    den_t = [torch.rand_like(p) + 0.1 for p in params] if adam else None
    layers = example_layers(model, params)
    loss_one = lambda out, yy: 0.5 * (out - yy).square().sum((1, 2)).mean()  # noqa: E731
    x, y = torch.randn(10, 3, 5), torch.randn(10, 3, 4)  # 10 examples of 3 positions
    exact = _per_example_sq(model, loss_one, x, y,
                            {k: d for (k, _), d in zip(model.named_parameters(), den_t)} if adam else None)
    norms = ExampleNorms(layers, example_denominators(layers, params, den_t) if adam else None, per_example=True)
    loss_one(model(x), y).backward()
    norms.after_backward()
    mean_v = norms.finish(params, den_t)[0].item() * 10 ** 2
    # examples 0, 3, 6 and 9: their mean, which over shuffled batches is unbiased for the whole batch's
    assert mean_v == pytest.approx(float(exact[::3].mean()), rel=1e-4)
    assert mean_v != pytest.approx(float(exact.mean()), rel=1e-3)


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_a_compiled_model_is_measured_with_pieces_from_the_start(how, caplog):
    """Hooks registered on a compiled model's layers (per-example norms) are not called once per
    micro-batch: 'auto' measures a compiled model with pieces from its first step, and 'examples'
    says at once that it cannot."""
    import logging

    from adabatch import AdaptiveBatchController, ControllerConfig
    from adabatch.config import ConfigError

    net = _mlp()
    if how == "torch.compile":
        model = torch.compile(net, backend="eager")
    else:
        model = net
        model.compile(backend="eager")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with pytest.raises(ConfigError, match="compiled"):
        AdaptiveBatchController(model, opt, 8, ControllerConfig(measurement="examples"))
    with caplog.at_level(logging.INFO, logger="adabatch.controller"):
        ctl = AdaptiveBatchController(model, opt, 8, ControllerConfig(initial_batch=16, measure_every=1))
        assert ctl.measurement == "pieces"  # an uncompiled MLP of Linear layers gets per-example norms
        g = torch.Generator().manual_seed(0)
        for _ in range(24):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            ctl.backward(nn.functional.cross_entropy(model(x), y))
            ctl.step()
    assert ctl.steps == 12 and ctl.estimator.measurements == 12
    assert "per-example norms unavailable" not in caplog.text  # no fallback in mid-run
    plain = _mlp()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    assert AdaptiveBatchController(plain, plain_opt, 8, ControllerConfig()).measurement == "examples"
