"""The general target's reference (fastcon/reference/losses.py: target_cross_entropy_reference and the losses
on it), each against an independent formulation: F.cross_entropy on hand-built logits, or explicit
loops over rows and positives. float64 throughout, so that agreement is to rounding."""
import pytest
import torch
import torch.nn.functional as F

from fastcon import reference as R
from helpers import make_features

D64 = dict(dtype=torch.float64)


def _loop_target_ce(logits, positives, keep, eps=0.0):
    """Row by row, in Python: −Σ_j q_ij·log p_ij over the kept columns."""
    total = 0.0
    for i in range(logits.shape[0]):
        cols = [j for j in range(logits.shape[1]) if keep[i, j]]
        pos = [j for j in cols if positives[i, j]]
        row = logits[i, cols]
        log_p = row - torch.logsumexp(row, 0)
        li = 0.0
        for c, j in enumerate(cols):
            q = (1 - eps) * (j in pos) / len(pos) + eps / len(cols)
            li -= q * log_p[c]
        total += li
    return total / logits.shape[0]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_single_positive_is_f_cross_entropy(eps):
    g = torch.Generator().manual_seed(0)
    logits = 10 * torch.randn(9, 13, generator=g, **D64)
    target = torch.randint(0, 13, (9,), generator=g)
    pos = F.one_hot(target, 13).bool()
    expected = F.cross_entropy(logits, target, label_smoothing=eps)
    assert torch.allclose(R.target_cross_entropy_reference(logits, pos, label_smoothing=eps), expected, rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_multi_positive_with_excluded_columns_matches_a_loop(eps):
    g = torch.Generator().manual_seed(1)
    logits = 5 * torch.randn(7, 11, generator=g, **D64)
    keep = torch.rand(7, 11, generator=g) > 0.3
    pos = (torch.rand(7, 11, generator=g) > 0.6) & keep
    pos[torch.arange(7), torch.arange(7)] = True
    keep[torch.arange(7), torch.arange(7)] = True
    got = R.target_cross_entropy_reference(logits, pos, keep, label_smoothing=eps)
    assert torch.allclose(got, torch.as_tensor(_loop_target_ce(logits, pos, keep, eps), **D64), rtol=1e-12)


def test_a_row_without_positive_is_an_error_naming_it():
    logits = torch.zeros(3, 4, **D64)
    pos = torch.eye(3, 4, dtype=torch.bool)
    pos[2, 2] = False
    with pytest.raises(ValueError, match="row 2 has no positive"):
        R.target_cross_entropy_reference(logits, pos)


def test_multi_positive_clip_with_unique_ids_is_clip():
    a, b = make_features(12, 12, 8, **D64)
    labels = torch.arange(12) * 3 + 1
    got = R.multi_positive_clip_loss_reference(a, b, 14.3, labels=labels, label_smoothing=0.1)
    assert torch.allclose(got, R.clip_loss_reference(a, b, 14.3, label_smoothing=0.1), rtol=1e-12)


def test_multi_positive_clip_with_shared_ids_matches_a_loop():
    a, b = make_features(10, 10, 8, **D64)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2, 5])
    s = 20.0
    logits = s * a @ b.T
    pos = labels[:, None] == labels[None, :]
    keep = torch.ones_like(pos)
    expected = (_loop_target_ce(logits, pos, keep) + _loop_target_ce(logits.T, pos.T, keep)) / 2
    got = R.multi_positive_clip_loss_reference(a, b, s, labels=labels)
    assert torch.allclose(got, torch.as_tensor(expected, **D64), rtol=1e-12)
    with pytest.raises(TypeError, match="integer ids"):
        R.multi_positive_clip_loss_reference(a, b, s, labels=labels.double())
    with pytest.raises(ValueError, match="10 ids"):
        R.multi_positive_clip_loss_reference(a, b, s, labels=labels[:9])


def _negatives(b, k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, k, d, generator=g, **D64), dim=-1)


@pytest.mark.parametrize("bias", [None, -2.0])
def test_global_negatives_are_f_cross_entropy_on_concatenated_logits(bias):
    b, k, d, s = 6, 3, 8, 14.3
    x, y = make_features(b, b, d, **D64)
    n = _negatives(b, k, d)
    cols = torch.cat([y, n.reshape(b * k, d)])
    logits = s * x @ cols.T + (0.0 if bias is None else bias)
    target = torch.arange(b)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2
    got = R.negatives_clip_loss_reference(x, y, n, s, bias)
    assert torch.allclose(got, expected, rtol=1e-12)
    # no negatives: CLIP itself
    none = R.negatives_clip_loss_reference(x, y, n[:, :0], s, bias)
    assert torch.allclose(none, R.clip_loss_reference(x, y, s, bias), rtol=1e-12)


def test_own_negatives_are_f_cross_entropy_per_row():
    b, k, d, s = 5, 4, 8, 20.0
    x, y = make_features(b, b, d, **D64)
    n = _negatives(b, k, d, seed=1)
    logits = torch.stack([s * torch.cat([(x[i] * y[i]).sum()[None], n[i] @ x[i]]) for i in range(b)])
    expected = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long), label_smoothing=0.1)
    got = R.negatives_clip_loss_reference(x, y, n, s, form="own", label_smoothing=0.1)
    assert torch.allclose(got, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="K >= 1"):
        R.negatives_clip_loss_reference(x, y, n[:, :0], s, form="own")
    with pytest.raises(ValueError, match="global"):
        R.negatives_clip_loss_reference(x, y, n, s, form="own", labels=torch.arange(b))


def test_masked_negative_slots_are_absent_columns():
    b, k, d, s = 6, 3, 8, 14.3
    x, y = make_features(b, b, d, **D64)
    n = _negatives(b, k, d, seed=2)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[:, 2] = False
    for form in ("global", "own"):
        got = R.negatives_clip_loss_reference(x, y, n, s, form=form, negative_mask=mask)
        assert torch.allclose(got, R.negatives_clip_loss_reference(x, y, n[:, :2], s, form=form), rtol=1e-12)


def test_false_negative_margin_drops_columns_above_the_positive_minus_margin():
    b, k, d, s, m = 8, 2, 8, 14.3, 0.1
    x, y = make_features(b, b, d, **D64)
    n = _negatives(b, k, d, seed=3)
    n[0, 0] = y[0]  # an exact duplicate of row 0's positive among its negatives: a false negative
    cols = torch.cat([y, n.reshape(b * k, d)])
    sim = x @ cols.T
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[torch.arange(b), torch.arange(b)] = True
    keep = pos | (sim <= sim[torch.arange(b), torch.arange(b)][:, None] - m)
    assert not keep[0, b]  # the duplicate is dropped
    expected = (_loop_target_ce(s * sim, pos, keep) + _loop_target_ce(s * sim[:, :b].T, pos[:, :b].T,
                                                                      keep[:, :b].T)) / 2
    got = R.negatives_clip_loss_reference(x, y, n, s, false_negative_margin=m)
    assert torch.allclose(got, torch.as_tensor(expected, **D64), rtol=1e-12)


def test_every_negative_dropped_gives_zero_not_nan():
    b, k, d = 4, 3, 8
    x, y = make_features(b, b, d, **D64)
    n = _negatives(b, k, d, seed=4)
    out = R.negatives_clip_loss_reference(x, y, n, 14.3, form="own", negative_mask=torch.zeros(b, k, dtype=torch.bool))
    assert out.item() == 0.0
    xg = x.clone().requires_grad_()
    R.negatives_clip_loss_reference(xg, y, n, 14.3, false_negative_margin=10.0).backward()
    assert torch.isfinite(xg.grad).all()


def test_negatives_bad_input():
    x, y = make_features(4, 4, 8, **D64)
    with pytest.raises(ValueError, match=r"\(B=4, K, D=8\)"):
        R.negatives_clip_loss_reference(x, y, torch.zeros(4, 2, 7, **D64), 10.0)
    with pytest.raises(ValueError, match="negative_mask"):
        R.negatives_clip_loss_reference(x, y, torch.zeros(4, 2, 8, **D64), 10.0,
                                        negative_mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="false_negative_margin"):
        R.negatives_clip_loss_reference(x, y, torch.zeros(4, 2, 8, **D64), 10.0, false_negative_margin=-0.1)


def _ntxent_lightly_style(out0, out1, t):
    """lightly's construction without a memory bank: in-view blocks with their diagonals removed."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    n = out0.shape[0]
    l00, l01 = out0 @ out0.T / t, out0 @ out1.T / t
    l10, l11 = out1 @ out0.T / t, out1 @ out1.T / t
    off = ~torch.eye(n, dtype=torch.bool)
    l00, l11 = l00[off].view(n, n - 1), l11[off].view(n, n - 1)
    logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)], 0)
    return F.cross_entropy(logits, torch.arange(n).repeat(2))


@pytest.mark.parametrize("n", [1, 2, 9])
def test_ntxent_is_lightlys_construction(n):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 16, generator=g, **D64), torch.randn(n, 16, generator=g, **D64)
    a.requires_grad_()
    got = R.ntxent_loss_reference(a, b, temperature=0.5)
    ga, = torch.autograd.grad(got, a)
    a2 = a.detach().clone().requires_grad_()
    expected = _ntxent_lightly_style(a2, b, 0.5)
    ea, = torch.autograd.grad(expected, a2)
    assert torch.allclose(got, expected, rtol=1e-12) and torch.allclose(ga, ea, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="temperature"):
        R.ntxent_loss_reference(a, b, temperature=0.0)
