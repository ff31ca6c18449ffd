"""Live-module weight sharing: NeMo 0.x's documented scenarios, and the ties it never built."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import wsurgery
from wsurgery.errors import SurgeryError, TransformError, UnknownNameError
from wsurgery.modules import (
    LoadResult,
    TiedView,
    WeightShareTransform,
    WeightSharing,
    freeze,
    get_weights,
    load_module,
    save_module,
    set_weights,
    tie_weights,
    tied_weights,
    unfreeze,
    untie_weights,
)

V, D = 11, 6  # vocabulary, model width


# ----------------------------------------------------------------------------- factories


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, D), nn.ReLU(), nn.Linear(D, 3))


def embedding(seed: int) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(V, D)


def head(seed: int) -> nn.Linear:
    """Linear(D, V) without bias: weight (V, D), like an Embedding(V, D)."""
    torch.manual_seed(seed)
    return nn.Linear(D, V, bias=False)


class TinyLM(nn.Module):
    """Embedding, a body, an output head (V, D) and a 'down' projection (D, V)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.body = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)  # (V, D): SAME as emb
        self.down = nn.Linear(V, D, bias=False)  # (D, V): TRANSPOSE of emb
        self.norm = nn.BatchNorm1d(D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(self.emb(tokens)))
        return self.head(h) + self.down(torch.softmax(self.head(h), -1)).sum(-1, keepdim=True)


def tied_lm(seed: int) -> TinyLM:
    m = TinyLM(seed)
    tie_weights(
        m,
        m,
        ["head.weight", "down.weight"],
        {"head.weight": ("emb.weight", WeightShareTransform.SAME), "down.weight": ("emb.weight", "TRANSPOSE")},
    )
    return m


class MixedLinear(WeightSharing, nn.Linear):
    pass


def tokens(seed: int = 0, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n,), generator=g)


def train(params, loss_fn, opt_cls, steps: int = 5, **kw) -> torch.optim.Optimizer:
    opt = opt_cls(params, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return opt


# ----------------------------------------------------------------------------- get / set


def test_two_fresh_modules_differ():
    a, b = mlp(0), mlp(1)
    wa, wb = get_weights(a), get_weights(b)
    assert list(wa) == ["0.weight", "0.bias", "2.weight", "2.bias"] == list(wb)
    assert all(not torch.equal(wa[n], wb[n]) for n in wa)


def test_set_weights_of_get_weights_copies():
    a, b = mlp(0), mlp(1)
    params_before = [id(p) for p in b.parameters()]
    set_weights(b, get_weights(a))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb) and pa is not pb
    assert [id(p) for p in b.parameters()] == params_before  # Parameter identity kept
    x = torch.randn(4, 5)
    assert torch.equal(a(x), b(x))


def test_a_later_change_does_not_reach_the_other():
    a, b = mlp(0), mlp(1)
    weights = get_weights(a)
    assert all(not w.requires_grad for w in weights.values())
    set_weights(b, weights)
    with torch.no_grad():
        a[0].weight.add_(1.0)  # change the source module
    assert not torch.equal(a[0].weight, b[0].weight)
    assert torch.equal(weights["0.weight"], b[0].weight)  # the dict did not move either
    weights["0.bias"].zero_()  # change the dict
    assert not torch.equal(b[0].bias, weights["0.bias"])
    with torch.no_grad():
        b[2].bias.add_(1.0)  # change the copy
    assert not torch.equal(a[2].bias, b[2].bias)


def test_partial_set_weights():
    a, b = mlp(0), mlp(1)
    before = get_weights(b)
    set_weights(b, {"2.bias": a[2].bias})
    assert torch.equal(b[2].bias, a[2].bias)
    for name in ("0.weight", "0.bias", "2.weight"):
        assert torch.equal(get_weights(b)[name], before[name])


def test_set_weights_keeps_dtype_and_device_of_the_module():
    b = mlp(1)
    value = torch.arange(3, dtype=torch.float64)
    set_weights(b, {"2.bias": value})
    assert b[2].bias.dtype == torch.float32 and torch.equal(b[2].bias, value.float())
    set_weights(b, {"2.bias": [1.0, 2.0, 3.0]})  # anything torch.as_tensor takes
    assert b[2].bias.tolist() == [1.0, 2.0, 3.0]


def test_set_weights_lists_every_problem_and_applies_nothing():
    b = mlp(1)
    before = get_weights(b)
    bad = {
        "0.bias": torch.zeros(D),  # fine, but must not be applied
        "0.wieght": torch.zeros(D, 5),  # unknown, close to 0.weight
        "2.weight": torch.zeros(D, 3),  # transposed shape
        "9.bias": torch.zeros(3),  # unknown, no close match worth giving
        "2.bias": "not a tensor",
    }
    with pytest.raises(SurgeryError) as info:
        set_weights(b, bad)
    err = info.value
    assert len(err.problems) == 4
    text = str(err)
    assert "4 problems" in text and "\n" not in text
    assert "'0.wieght'" in text and "did you mean '0.weight'" in text
    assert "'9.bias'" in text
    assert "'2.weight'" in text and "(3, 6)" in text and "(6, 3)" in text
    assert "'2.bias'" in text and "not a tensor" in text
    after = get_weights(b)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_set_weights_unknown_names_only_is_an_unknown_name_error():
    with pytest.raises(UnknownNameError) as info:
        set_weights(mlp(0), {"0.weigth": torch.zeros(D, 5), "1.weight": torch.zeros(1)})
    assert "0.weigth" in str(info.value)
    assert len(info.value.problems) == 2 and "did you mean '0.weight'" in str(info.value)


def test_get_weights_keeps_ties_inside_the_dict():
    m = tied_lm(0)
    w = get_weights(m)
    assert "head.weight" in w and "down.weight" in w and "down.parametrizations.weight.original" not in w
    assert w["head.weight"] is w["emb.weight"]
    assert w["down.weight"]._base is w["emb.weight"] and torch.equal(w["down.weight"], w["emb.weight"].T)
    assert w["emb.weight"].data_ptr() != m.emb.weight.data_ptr()


def test_set_weights_through_a_tie_writes_the_source():
    m = tied_lm(0)
    value = torch.randn(D, V)
    set_weights(m, {"down.weight": value})
    assert torch.equal(m.emb.weight, value.T) and torch.equal(m.head.weight, value.T)
    assert torch.equal(m.down.weight, value)
    # a value that is a view of the module's own weights is read before anything is written
    set_weights(m, {"down.weight": m.emb.weight.detach().T * 1, "body.weight": m.body.weight.detach().T})
    assert torch.equal(m.down.weight, value)


# ----------------------------------------------------------------------------- SAME ties


def _sgd_momentum_run(tie: bool):
    emb, out = embedding(0), head(1)
    if tie:
        tie_weights(out, emb, ["weight"], {"weight": ("weight", WeightShareTransform.SAME)})
    both = nn.ModuleDict({"emb": emb, "out": out})
    t = tokens()

    def loss():
        return nn.functional.cross_entropy(out(emb(t)), t)

    opt = train(both.parameters(), loss, torch.optim.SGD, steps=6, lr=0.5, momentum=0.9)
    return emb, out, opt


def test_same_tie_embedding_and_head_train_as_one_parameter():
    emb, out, opt = _sgd_momentum_run(tie=True)
    assert out.weight is emb.weight
    assert torch.equal(out.weight, emb.weight)
    assert not torch.equal(emb.weight, embedding(0).weight)  # it trained
    group = opt.param_groups[0]["params"]
    assert len(group) == 1 and group[0] is emb.weight
    assert len(opt.state) == 1 and "momentum_buffer" in opt.state[emb.weight]
    assert [n for n, _ in out.named_parameters()] == ["weight"]


def test_the_same_modules_untied_stay_different():
    emb, out, opt = _sgd_momentum_run(tie=False)
    assert out.weight is not emb.weight
    assert not torch.equal(out.weight, emb.weight)
    assert len(opt.state) == 2


def test_tie_to_the_same_name_by_default_and_again_is_a_no_op():
    a, b = mlp(0), mlp(1)
    tie_weights(b, a, ["0.weight", "2.bias"])
    assert b[0].weight is a[0].weight and b[2].bias is a[2].bias and b[0].bias is not a[0].bias
    tie_weights(b, a, "0.weight")  # tied already
    assert b[0].weight is a[0].weight


# ----------------------------------------------------------------------------- view ties


def test_transpose_tie_follows_adam_and_one_gradient():
    torch.manual_seed(0)
    src = nn.Linear(D, V)  # weight (V, D)
    dst = nn.Linear(V, D)  # weight (D, V)
    tie_weights(dst, src, ["weight"], {"weight": ("weight", WeightShareTransform.TRANSPOSE)})

    assert isinstance(dst.parametrizations.weight[0], TiedView)
    assert dst.parametrizations.weight.original is src.weight  # one Parameter, no copy
    assert torch.equal(dst.weight, src.weight.T)
    assert dst.weight.data_ptr() == src.weight.data_ptr()  # a view
    both = nn.ModuleDict({"src": src, "dst": dst})
    params = list(both.parameters())
    assert len(params) == 3 and sum(p is src.weight for p in params) == 1

    x = torch.randn(4, D)

    def loss():
        return (dst(src(x)) ** 2).mean()

    opt = train(params, loss, torch.optim.Adam, steps=5, lr=0.05)
    assert torch.equal(dst.weight, src.weight.T)
    assert len(opt.state) == 3 and opt.state[src.weight]["exp_avg"].shape == (V, D)


def test_a_loss_on_the_tied_side_alone_moves_the_source():
    torch.manual_seed(0)
    src, dst = nn.Linear(D, V), nn.Linear(V, D)
    tie_weights(dst, src, ["weight"], {"weight": ("weight", "transpose")})
    before = src.weight.detach().clone()
    y = torch.randn(4, V)
    opt = torch.optim.Adam(dst.parameters(), lr=0.05)  # only the tied module's parameters
    assert any(p is src.weight for p in dst.parameters())
    opt.zero_grad()
    dst(y).pow(2).mean().backward()
    assert src.weight.grad is not None and src.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(src.weight, before)
    assert torch.equal(dst.weight, src.weight.T)


@pytest.mark.parametrize(
    "transform",
    [
        WeightShareTransform.TRANSPOSE,
        "TRANSPOSE",
        "Transpose",
        "WeightShareTransform.TRANSPOSE",
        1,
        ["transpose"],
        ["transpose(0,1)"],
        "permute(1,0)",
    ],
)
def test_transpose_spellings(transform):
    torch.manual_seed(0)
    src, dst = nn.Linear(D, V), nn.Linear(V, D)
    tie_weights(dst, src, ["weight"], {"weight": ("weight", transform)})
    assert torch.equal(dst.weight, src.weight.T)


def test_weight_share_transform_parse():
    assert WeightShareTransform.parse("same") is WeightShareTransform.SAME
    assert WeightShareTransform.parse("WeightShareTransform.SAME") is WeightShareTransform.SAME
    assert WeightShareTransform.parse(0) is WeightShareTransform.SAME
    assert WeightShareTransform.parse(" transpose ") is WeightShareTransform.TRANSPOSE
    assert WeightShareTransform.TRANSPOSE.specs() == ["transpose"] and WeightShareTransform.SAME.specs() == []
    with pytest.raises(TransformError, match="TRANSPOSE"):
        WeightShareTransform.parse("transpos")
    with pytest.raises(TransformError):
        WeightShareTransform.parse(2)


def test_slice_and_reshape_ties_are_live_views():
    torch.manual_seed(0)
    big = nn.Linear(D, 2 * V, bias=False)  # (2V, D)
    lo, hi = nn.Linear(D, V, bias=False), nn.Linear(D, V, bias=False)
    flat = nn.Linear(2 * V * D, 1, bias=False)  # (1, 2V*D)
    tie_weights(lo, big, ["weight"], {"weight": ("weight", f"slice(0,0,{V})")})
    tie_weights(hi, big, ["weight"], {"weight": ("weight", [f"slice(0,{V})"])})
    tie_weights(flat, big, ["weight"], {"weight": ("weight", f"reshape(1,{2 * V * D})")})
    with torch.no_grad():
        big.weight.mul_(3)
    assert torch.equal(lo.weight, big.weight[:V]) and torch.equal(hi.weight, big.weight[V:])
    assert torch.equal(flat.weight, big.weight.reshape(1, -1))
    params = list(nn.ModuleList([big, lo, hi, flat]).parameters())
    assert len(params) == 1


def test_tying_to_a_tied_weight_composes_onto_its_root():
    torch.manual_seed(0)
    a, b, c = nn.Linear(D, V), nn.Linear(V, D), nn.Linear(D, V)
    tie_weights(b, a, ["weight"], {"weight": ("weight", "transpose")})
    tie_weights(c, b, ["weight"], {"weight": ("weight", "transpose")})  # transpose of a transpose
    assert c.weight is a.weight  # composed to the identity: one Parameter
    d = nn.Linear(V, D)
    tie_weights(d, c, ["weight"], {"weight": ("weight", "transpose")})
    assert d.parametrizations.weight.original is a.weight


def test_retie_and_untie():
    torch.manual_seed(0)
    a, b, c = nn.Linear(D, V), nn.Linear(V, D), nn.Linear(D, V)
    tie_weights(b, a, ["weight"], {"weight": ("weight", "transpose")})
    tie_weights(b, a, ["weight"], {"weight": ("weight", "transpose")})  # again: no-op
    assert len(b.parametrizations.weight) == 1
    tie_weights(b, c, ["weight"], {"weight": ("weight", "transpose")})  # re-tied elsewhere
    assert b.parametrizations.weight.original is c.weight and torch.equal(b.weight, c.weight.T)
    a_before = a.weight.detach().clone()
    assert untie_weights(b, ["weight"]) == ["weight"]
    assert not parametrize.is_parametrized(b) and type(b) is nn.Linear
    assert isinstance(b.weight, nn.Parameter) and torch.equal(b.weight, c.weight.T)
    with torch.no_grad():
        b.weight.add_(1)
    assert torch.equal(a.weight, a_before) and torch.equal(b.weight, c.weight.T + 1)  # source untouched
    assert c.weight.shape == (V, D)
    with pytest.raises(UnknownNameError, match="did you mean 'weight'"):
        untie_weights(b, ["wieght"])


def test_untie_a_same_tie_gives_a_copy():
    a, b = mlp(0), mlp(1)
    tie_weights(b, a, ["0.weight"])
    untie_weights(b, "0.weight")
    assert b[0].weight is not a[0].weight and torch.equal(b[0].weight, a[0].weight)


def test_untie_everything_inside_a_module():
    m = tied_lm(0)
    assert untie_weights(m) == ["head.weight", "down.weight"]
    assert tied_weights(m) == {} and type(m.down) is nn.Linear
    assert torch.equal(m.head.weight, m.emb.weight) and m.head.weight is not m.emb.weight


# ----------------------------------------------------------------------------- refusals


def test_shape_misfit_is_refused_with_both_names_and_shapes():
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(D, V)
    before = b.weight
    with pytest.raises(SurgeryError) as info:
        tie_weights(b, a, ["weight"], {"weight": ("weight", WeightShareTransform.TRANSPOSE)})
    text = str(info.value)
    assert "module's 'weight' has shape (11, 6)" in text and "other's 'weight' has shape (11, 6)" in text
    assert "after transpose (6, 11)" in text
    assert b.weight is before and not parametrize.is_parametrized(b)
    emb, small = embedding(0), nn.Linear(D, V - 1, bias=False)
    with pytest.raises(SurgeryError, match=r"\(10, 6\).*\(11, 6\)"):
        tie_weights(small, emb, ["weight"])


def test_dtype_and_device_misfits_are_refused():
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(D, V).double()
    with pytest.raises(SurgeryError, match="dtype misfit.*float64.*float32"):
        tie_weights(b, a, ["weight"])
    c = nn.Linear(D, V, device="meta")
    with pytest.raises(SurgeryError, match="device misfit.*meta.*cpu"):
        tie_weights(c, a, ["weight"])


@pytest.mark.parametrize("spec", ["cast(bfloat16)", "scale(0.5)", ["transpose", "scale(2)"]])
def test_non_view_transforms_are_refused_for_ties(spec):
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(V, D)
    with pytest.raises(SurgeryError, match="view steps only.*set_weights"):
        tie_weights(b, a, ["weight"], {"weight": ("weight", spec)})
    assert not parametrize.is_parametrized(b)


def test_a_tie_problem_report_lists_everything_and_ties_nothing():
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(V, D)
    with pytest.raises(SurgeryError) as info:
        tie_weights(
            b,
            a,
            ["bias", "weight", "wieght"],
            {
                "weight": ("weight", "transpose"),  # fine
                "bias": ("bais", "same"),  # unknown on the other side
                "extra": ("weight", "same"),  # not in weight_names
            },
        )
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    assert "'bais'" in text and "did you mean 'bias'" in text
    assert "'wieght'" in text and "'extra'" in text and "not in weight_names" in text
    assert not parametrize.is_parametrized(b)


def test_bad_transform_spec_and_bad_entry_are_reported():
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(V, D)
    with pytest.raises(SurgeryError, match="transpse"):
        tie_weights(b, a, ["weight"], {"weight": ("weight", "transpse")})
    with pytest.raises(SurgeryError, match=r"\(other_name, transform\)"):
        tie_weights(b, a, ["weight"], {"weight": ("weight",)})


def test_reshape_that_is_not_a_view_is_refused():
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(V * D, 1, bias=False)
    with pytest.raises(SurgeryError, match="reshape"):
        tie_weights(b, a, ["weight"], {"weight": ("weight", ["transpose", f"reshape(1,{V * D})"])})


def test_cycles_and_conflicts_are_refused():
    torch.manual_seed(0)
    a, b = nn.Linear(D, D), nn.Linear(D, D)
    tie_weights(b, a, ["weight"], {"weight": ("weight", "transpose")})
    with pytest.raises(SurgeryError, match="cyclic"):
        tie_weights(a, b, ["weight"])  # a = b = transpose(a)
    with pytest.raises(SurgeryError, match="cyclic"):
        tie_weights(a, a, ["weight"], {"weight": ("weight", "transpose")})
    tie_weights(a, b, ["weight"], {"weight": ("weight", "permute(1,0)")})  # a = a: nothing to do
    assert isinstance(a.weight, nn.Parameter) and not parametrize.is_parametrized(a)
    m = tied_lm(0)
    other = embedding(5)
    with pytest.raises(SurgeryError, match="conflicting ties.*'head.weight'.*'down.weight'"):
        tie_weights(m, other, ["emb.weight"], {"emb.weight": ("weight", "same")})
    # re-tying every dependent in the same call is fine
    tie_weights(
        m,
        other,
        ["emb.weight", "head.weight", "down.weight"],
        {"emb.weight": "weight", "head.weight": "weight", "down.weight": ("weight", "transpose")},
    )
    assert m.emb.weight is other.weight and m.head.weight is other.weight
    assert m.down.parametrizations.weight.original is other.weight
    with pytest.raises(SurgeryError, match="same call"):
        n = TinyLM(0)
        tie_weights(n, n, ["head.weight", "emb.weight"], {"head.weight": "emb.weight", "emb.weight": "head.weight"})


def test_foreign_parametrizations_are_refused():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(D, V)
    parametrize.register_parametrization(a, "weight", Double())
    with pytest.raises(SurgeryError, match="computed by a parametrization"):
        tie_weights(b, a, ["weight"])
    with pytest.raises(SurgeryError, match="has a parametrization"):
        tie_weights(a, b, ["weight"])
    with pytest.raises(SurgeryError, match="right_inverse"):
        set_weights(a, {"weight": torch.zeros(V, D)})
    assert torch.equal(get_weights(a)["weight"], a.weight)  # the computed value, by its attribute name


def test_broken_tie_invariants_are_reported_with_both_values():
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(V, D)
    tie_weights(b, a, ["weight"], {"weight": ("weight", "transpose")})
    with torch.no_grad():
        a.weight.set_(torch.zeros(V + 1, D))  # the source changed shape behind the tie's back
    with pytest.raises(SurgeryError, match=r"tied shape: \(6, 11\).*\(6, 12\)"):
        b.weight  # noqa: B018
    with torch.no_grad():
        a.weight.set_(torch.zeros(V, D))
    with pytest.raises(RuntimeError, match="right_inverse"):
        b.weight = torch.ones(D, V)  # assignment would replace the source's storage
    assert a.weight.shape == (V, D) and not a.weight.any()


def test_identity_chains_become_same_ties():
    torch.manual_seed(0)
    a, b = nn.Linear(D, V), nn.Linear(D, V)
    tie_weights(b, a, ["weight"], {"weight": ("weight", ["transpose", "transpose", f"reshape({V},{D})"])})
    assert b.weight is a.weight
    c = nn.Linear(V, D)
    tie_weights(c, a, ["weight"], {"weight": ("weight", ["permute(1,0)", "transpose", "transpose(0,1)"])})
    assert c.parametrizations.weight[0].specs() == ["transpose"]


def test_ties_survive_dtype_conversion_of_either_module():
    m = tied_lm(0).double()
    assert m.head.weight is m.emb.weight and m.down.parametrizations.weight.original is m.emb.weight
    assert m.down.weight.dtype == torch.float64 and torch.equal(m.down.weight, m.emb.weight.T)
    torch.manual_seed(0)
    src, dst = nn.Linear(D, V), nn.Linear(V, D)
    tie_weights(dst, src, ["weight"], {"weight": ("weight", "transpose")})
    src.half()
    assert dst.weight.dtype == torch.float16 and torch.equal(dst.weight, src.weight.T)


def test_module_type_is_checked():
    with pytest.raises(TypeError, match="nn.Module"):
        get_weights({"weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- freeze, mixin


def test_freeze_and_unfreeze():
    m = mlp(0)
    freeze(m)
    assert not any(p.requires_grad for p in m.parameters())
    unfreeze(m, ["0.weight"])
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.weight"]
    unfreeze(m)
    freeze(m, "2")  # a module prefix
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.weight", "0.bias"]
    with pytest.raises(UnknownNameError) as info:
        freeze(m, ["0.wieght", "0.bias", "7"])
    assert len(info.value.problems) == 2 and "did you mean '0.weight'" in str(info.value)
    assert m[0].bias.requires_grad  # nothing changed


def test_freezing_a_tied_view_freezes_its_source():
    m = tied_lm(0)
    freeze(m, ["down.weight"])
    assert not m.emb.weight.requires_grad and not m.down.weight.requires_grad
    unfreeze(m, "head")
    assert m.emb.weight.requires_grad


def test_mixin_nemo_style():
    torch.manual_seed(0)
    enc, dec = MixedLinear(D, V), MixedLinear(V, D)
    copy_of = MixedLinear(D, V)
    copy_of.set_weights(enc.get_weights())
    assert torch.equal(copy_of.weight, enc.weight)
    dec.tie_weights_with(enc, ["weight"], {"weight": ["weight", WeightShareTransform.TRANSPOSE]})
    assert torch.equal(dec.weight, enc.weight.T) and isinstance(dec, MixedLinear)
    assert set(dec.get_weights()) == {"weight", "bias"}
    dec.freeze(["bias"])
    assert not dec.bias.requires_grad and dec.weight.requires_grad
    dec.freeze()
    assert not enc.weight.requires_grad  # one tensor
    dec.unfreeze()
    assert enc.weight.requires_grad
    assert dec.tied_weights() == {}  # its source lives in another module
    assert dec.untie_weights(["weight"]) == ["weight"] and isinstance(dec, MixedLinear)


# ----------------------------------------------------------------------------- tied_weights


def test_tied_weights_lists_the_ties_inside_one_module():
    m = tied_lm(0)
    assert tied_weights(m) == {"head.weight": ("emb.weight", []), "down.weight": ("emb.weight", ["transpose"])}
    names = [n for n, _ in m.named_parameters(remove_duplicate=False)]
    assert "down.parametrizations.weight.original" in names
    assert tied_weights(TinyLM(0)) == {}
    shared = nn.Linear(2, 2)
    assert tied_weights(nn.ModuleDict({"a": shared, "b": shared})) == {
        "b.weight": ("a.weight", []),
        "b.bias": ("a.bias", []),
    }


def test_a_tied_module_deepcopies_with_its_ties():
    m = copy.deepcopy(tied_lm(0))
    assert m.head.weight is m.emb.weight and m.down.parametrizations.weight.original is m.emb.weight
    assert torch.equal(m.down.weight, m.emb.weight.T)


# ----------------------------------------------------------------------------- save / load


def _trained_lm(seed: int) -> TinyLM:
    m = tied_lm(seed)
    t = tokens(seed)
    train(m.parameters(), lambda: m(t).pow(2).mean(), torch.optim.Adam, steps=3, lr=0.05)
    m.eval()
    return m


def test_save_and_load_module_restore_ties_and_values(tmp_path):
    m = _trained_lm(0)
    path = tmp_path / "lm.safetensors"
    save_module(m, path)

    ckpt = wsurgery.load(path)
    assert "head.weight" not in ckpt.stored and "down.weight" not in ckpt.stored
    assert {n: (a.source, a.specs) for n, a in ckpt.aliases.items()} == {
        "head.weight": ("emb.weight", []),
        "down.weight": ("emb.weight", ["transpose"]),
    }
    raw = json.loads(ckpt.metadata.get("wsurgery.aliases", "{}") or "{}") if ckpt.metadata else {}
    assert "down.weight" not in {k for k, v in raw.items() if isinstance(v, str)}
    ckpt.close()

    fresh = TinyLM(1)  # untied, other values
    result = load_module(fresh, path)
    assert result == LoadResult([], [])
    assert fresh.head.weight is fresh.emb.weight
    assert isinstance(fresh.down.parametrizations.weight[0], TiedView)
    assert fresh.down.parametrizations.weight.original is fresh.emb.weight
    theirs, ours = get_weights(m), get_weights(fresh)
    assert list(theirs) == list(ours) and all(torch.equal(theirs[n], ours[n]) for n in theirs)
    assert torch.equal(fresh.norm.running_mean, m.norm.running_mean)
    fresh.eval()
    t = tokens(3)
    assert torch.equal(fresh(t), m(t))
    assert len(list(fresh.parameters())) == len(list(m.parameters()))


def test_load_module_into_a_module_tied_already_and_into_a_plain_state_dict(tmp_path):
    m = _trained_lm(0)
    path = tmp_path / "lm.safetensors"
    save_module(m, path)
    again = tied_lm(2)
    emb_param = again.emb.weight
    load_module(again, path)
    assert again.emb.weight is emb_param and again.head.weight is emb_param  # ties kept, not remade
    assert torch.equal(again.down.weight, m.down.weight)
    # the file reads as a plain state dict with views too
    sd = wsurgery.load_state_dict(path)
    assert torch.equal(sd["down.weight"], m.down.weight) and sd["down.weight"].data_ptr() == sd["emb.weight"].data_ptr()


def test_load_module_strict_lists_every_problem_and_changes_nothing(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_module(mlp(0), path)
    target = nn.Sequential(nn.Linear(5, D), nn.ReLU(), nn.Linear(D, 3), nn.Linear(3, 1))
    before = get_weights(target)
    with pytest.raises(UnknownNameError) as info:
        load_module(target, path)
    assert len(info.value.problems) == 2 and "'3.weight'" in str(info.value)
    assert all(torch.equal(get_weights(target)[n], before[n]) for n in before)
    result = load_module(target, path, strict=False)
    assert result == LoadResult(["3.weight", "3.bias"], [])
    assert torch.equal(target[0].weight, mlp(0)[0].weight)

    wrong = nn.Sequential(nn.Linear(5, D), nn.ReLU(), nn.Linear(D, 4))
    with pytest.raises(SurgeryError, match=r"'2.weight': shape misfit.*\(4, 6\).*\(3, 6\)"):
        load_module(wrong, path, strict=False)
    fewer = nn.Sequential(nn.Linear(5, D))
    assert load_module(fewer, path, strict=False) == LoadResult([], ["2.bias", "2.weight"])


def test_load_module_reports_tie_misfits_with_the_other_problems(tmp_path):
    path = tmp_path / "lm.safetensors"
    save_module(tied_lm(0), path)

    class Odd(TinyLM):
        def __init__(self):
            super().__init__(3)
            self.down = nn.Linear(D, V, bias=False)  # (V, D): transpose(emb) cannot fit
            self.extra = nn.Linear(2, 2)

    odd = Odd()
    before = get_weights(odd)
    with pytest.raises(SurgeryError) as info:
        load_module(odd, path)
    text = str(info.value)
    assert "'extra.weight' of the module is missing" in text
    assert "'down.weight' -> 'emb.weight': shape misfit" in text and "(11, 6)" in text and "(6, 11)" in text
    assert all(torch.equal(get_weights(odd)[n], before[n]) for n in before)


def test_load_module_refuses_to_merge_different_values_into_one_tie(tmp_path):
    path = tmp_path / "untied.safetensors"
    save_module(TinyLM(0), path)  # head and emb stored separately, with different values
    m = tied_lm(1)
    before = get_weights(m)
    with pytest.raises(SurgeryError, match="'head.weight' is the same tensor as 'emb.weight'.*untie_weights"):
        load_module(m, path)
    assert all(torch.equal(get_weights(m)[n], before[n]) for n in before)
    untie_weights(m)
    load_module(m, path)
    assert torch.equal(m.head.weight, TinyLM(0).head.weight)


def test_save_module_of_a_module_tied_to_another_stores_the_value(tmp_path):
    torch.manual_seed(0)
    src, dst = nn.Linear(D, V), nn.Linear(V, D)
    tie_weights(dst, src, ["weight"], {"weight": ("weight", "transpose")})
    path = tmp_path / "dst.safetensors"
    save_module(dst, path)
    sd = wsurgery.load_state_dict(path)
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], src.weight.T)
    plain = nn.Linear(V, D)
    load_module(plain, path)
    assert torch.equal(plain.weight, src.weight.T)


def test_load_module_reads_files_written_by_save_model_convention(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_model

    torch.manual_seed(0)
    m = TinyLM(0)
    m.head.weight = m.emb.weight  # a classic tie
    path = tmp_path / "hf.safetensors"
    save_model(m, str(path))
    fresh = TinyLM(4)
    load_module(fresh, path)
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, m.emb.weight)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ties_on_cuda(tmp_path):
    m = tied_lm(0).cuda()
    assert m.head.weight is m.emb.weight and m.down.parametrizations.weight.original is m.emb.weight
    assert m.emb.weight.is_cuda and m.down.weight.is_cuda
    t = tokens().cuda()
    train(m.parameters(), lambda: m(t).pow(2).mean(), torch.optim.Adam, steps=3, lr=0.05)
    assert torch.equal(m.down.weight, m.emb.weight.T)
    src, dst = nn.Linear(D, V).cuda(), nn.Linear(V, D).cuda()
    tie_weights(dst, src, ["weight"], {"weight": ("weight", "transpose")})
    assert dst.weight.data_ptr() == src.weight.data_ptr()
    with pytest.raises(SurgeryError, match="device misfit"):
        tie_weights(nn.Linear(D, V), src, ["weight"])
    path = tmp_path / "cuda.safetensors"
    save_module(m, path)
    fresh = TinyLM(1).cuda()
    load_module(fresh, path)
    assert fresh.head.weight is fresh.emb.weight and fresh.emb.weight.is_cuda
    assert torch.equal(fresh.down.weight, m.down.weight)


def test_a_tie_of_a_live_module_and_of_a_file_refuse_a_non_view_by_the_same_rule(tmp_path):
    from safetensors.torch import save_file

    import wsurgery
    from wsurgery.transforms import parse

    rule = parse("scale(2)").tie_problem()
    assert rule is not None and rule.startswith("a tie takes view steps only")
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    with pytest.raises(SurgeryError) as live:
        tie_weights(a, b, "weight", {"weight": ("weight", "scale(2)")})
    save_file({"a": torch.ones(3, 3), "b": torch.ones(3, 3)}, tmp_path / "m.safetensors")
    with wsurgery.open(tmp_path / "m.safetensors") as c, pytest.raises(SurgeryError) as file:
        c.tie("a", "b", "scale(2)")
    assert rule in str(live.value) and rule in str(file.value)
