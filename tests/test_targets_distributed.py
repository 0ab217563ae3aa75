"""The general-target losses with a process_group, on gloo ranks (W = 2 and 3): every rank's loss and
the gradients of its inputs against a single-process float64 computation on the concatenated batch
(every rank builds all ranks' data from their seeds, so the oracle needs no communication).

* ``negatives_clip_loss`` (global form: each rank's negatives travel with its texts; with labels, slot
  masks, the GIST margin, label smoothing; own form): every rank returns the loss of the whole batch,
  each rank's inputs receive their slice of its gradient;
* ``clip_loss(labels=...)`` in open_clip's modes: ``local_loss=False`` (the global loss; with
  ``gather_with_grad`` the feature gradients times the sum of the ranks' upstream gradients, W here)
  and ``local_loss=True`` (this rank's rows against the gathered batch, the gathered features with or
  without gradient); with a global pair mask, also without labels (every pair its own id across ranks);
* ``clip_loss(debias=...)`` (docs/losses.md §2.5) in the same modes, and with a pair mask.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import close_gloo, run_gloo

B, K, D = 5, 2, 8
BACKENDS = ["torch", "cpp"]


def _data(world, seed=0):
    """Every rank's (x, y, negatives, labels, negative_mask), float64, and the global pair mask."""
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed + 17 * r)
        x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
        y = F.normalize(x + 0.8 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
        negs = F.normalize(torch.randn(B, K, D, generator=g, dtype=torch.float64), dim=-1)
        negs[0, 0] = y[1]  # an in-batch duplicate as a negative (ties, the margin's case)
        labels = torch.randint(0, 3, (B,), generator=g)
        mask = torch.rand(B, K, generator=g) > 0.3
        out.append((x, y, negs, labels, mask))
    n = world * B
    g = torch.Generator().manual_seed(seed + 999)
    pair_mask = (torch.rand(n, n, generator=g) > 0.25) | torch.eye(n, dtype=torch.bool)
    return out, pair_mask


def _leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _err(got, expected):
    """max |got − expected| relative to max |expected|, with a floor of 1e-3 for gradients that are 0
    up to rounding (a CLIP loss's bias: each row's softmax gradient sums to 0)."""
    got, expected = got.detach().double(), expected.detach().double()
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-3)).item()


def _cases():
    yield "neg-global", dict(form="global")
    yield "neg-labels-margin-mask-eps", dict(form="global", labels=True, margin=0.1, mask=True, eps=0.1)
    yield "neg-own", dict(form="own", margin=0.05, mask=True)
    for local in (False, True):
        for gwg in (False, True):
            yield f"labels-local{local}-gwg{gwg}", dict(kind="labels", local_loss=local, gather_with_grad=gwg)
    yield "labels-pairmask-eps", dict(kind="labels", pair_mask=True, eps=0.1)
    yield "pairmask-no-labels", dict(kind="labels", pair_mask=True, no_labels=True)
    for local in (False, True):
        for gwg in (False, True):
            yield f"debias-local{local}-gwg{gwg}", dict(kind="labels", debias=0.2, local_loss=local,
                                                        gather_with_grad=gwg)
    yield "debias-pairmask", dict(kind="labels", debias=0.4, pair_mask=True)


def _ours(case, rank, group, data, pair_mask, backend):
    import fastcon.functional as FC

    x, y, negs, labels, mask = data[rank]
    s = torch.tensor(12.0, dtype=torch.float64)
    bias = torch.tensor(-0.5, dtype=torch.float64)
    leaves = _leaves([x, y, negs, s, bias])
    if case.get("kind") == "labels":
        debias = case.get("debias", 0.0)
        inputs = [leaves[0], leaves[1], leaves[3]] + ([] if debias else [leaves[4]])
        out = FC.clip_loss(*inputs, labels=None if debias or case.get("no_labels") else labels,
                           pair_mask=pair_mask if case.get("pair_mask") else None, debias=debias,
                           label_smoothing=case.get("eps", 0.0), local_loss=case.get("local_loss", False),
                           gather_with_grad=case.get("gather_with_grad", False), process_group=group,
                           backend=backend)
        return out, torch.autograd.grad(out, inputs)
    out = FC.negatives_clip_loss(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], form=case["form"],
                                 negative_mask=mask if case.get("mask") else None,
                                 false_negative_margin=case.get("margin"),
                                 labels=labels if case.get("labels") else None, label_smoothing=case.get("eps", 0.0),
                                 process_group=group, backend=backend)
    return out, torch.autograd.grad(out, leaves)


def _oracle(case, rank, world, data, pair_mask):
    """Loss and this rank's gradients from one process, float64."""
    from fastcon import reference as R

    xs, ys, ns, ls, ms = (list(t) for t in zip(*data))
    sl = slice(rank * B, (rank + 1) * B)
    s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    x_all, y_all, n_all = _leaves([torch.cat(xs), torch.cat(ys), torch.cat(ns)])
    ids = torch.cat(ls)
    if case.get("kind") == "labels":
        eps = case.get("eps", 0.0)
        pm = pair_mask if case.get("pair_mask") else None
        debias = case.get("debias", 0.0)
        if debias or case.get("no_labels"):
            ids = torch.arange(world * B)
        scalars = [s] if debias else [s, bias]
        if not case.get("local_loss"):
            if debias:
                logits = s * x_all @ y_all.T
                idx = torch.arange(world * B)
                keep = pm if pm is not None else torch.ones_like(logits, dtype=torch.bool)
                loss = (R.debiased_rows_reference(logits, idx, keep, debias, s).mean()
                        + R.debiased_rows_reference(logits.T, idx, keep.T, debias, s).mean()) / 2
            else:
                loss = R.multi_positive_clip_loss_reference(x_all, y_all, s, bias, labels=ids, label_smoothing=eps,
                                                            pair_mask=pm)
            gx, gy, *gsc = torch.autograd.grad(loss, [x_all, y_all] + scalars)
            w = world if case.get("gather_with_grad") else 1
            return loss, [w * gx[sl], w * gy[sl]] + gsc

        def row_loss(logits, rs):
            if debias:
                return R.debiased_rows_reference(logits, torch.arange(rs.start, rs.stop), None, debias, s).mean()
            return R.target_cross_entropy_reference(logits + bias, ids[rs, None] == ids[None, :])

        def local(r, x_all_, y_all_):
            rs = slice(r * B, (r + 1) * B)
            return (row_loss(s * x_all_[rs] @ y_all_.T, rs) + row_loss(s * y_all_[rs] @ x_all_.T, rs)) / 2

        if case.get("gather_with_grad"):
            total = sum(local(r, x_all, y_all) for r in range(world))
            gx, gy = torch.autograd.grad(total, [x_all, y_all])
            loss = local(rank, x_all, y_all)
            return loss, [gx[sl], gy[sl]] + list(torch.autograd.grad(loss, scalars))
        # the gathered copies carry no gradient: only this rank's rows do
        xr, yr = _leaves([x_all[sl], y_all[sl]])
        x_cat = torch.cat([x_all[:sl.start].detach(), xr, x_all[sl.stop:].detach()])
        y_cat = torch.cat([y_all[:sl.start].detach(), yr, y_all[sl.stop:].detach()])
        loss = (row_loss(s * xr @ y_cat.detach().T, sl) + row_loss(s * yr @ x_cat.detach().T, sl)) / 2
        return loss, list(torch.autograd.grad(loss, [xr, yr] + scalars))
    mask = torch.cat(ms) if case.get("mask") else None
    loss = R.negatives_clip_loss_reference(x_all, y_all, n_all, s, bias, form=case["form"], negative_mask=mask,
                                           false_negative_margin=case.get("margin"),
                                           labels=ids if case.get("labels") else None,
                                           label_smoothing=case.get("eps", 0.0))
    gx, gy, gn, gs, gb = torch.autograd.grad(loss, [x_all, y_all, n_all, s, bias])
    return loss, [gx[sl], gy[sl], gn[sl], gs, gb]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data, pair_mask = _data(world)
        results = {}
        for name, case in _cases():
            expected, expected_grads = _oracle(case, rank, world, data, pair_mask)
            for backend in BACKENDS:
                got, grads = _ours(case, rank, dist.group.WORLD, data, pair_mask, backend)
                errs = [_err(got, expected)] + [_err(g, e) for g, e in zip(grads, expected_grads)]
                results[f"{name}/{backend}"] = max(errs)
        out.put((rank, results))
    except Exception as exc:  # reported to the test, which fails on it
        out.put((rank, {"error": repr(exc)}))
    finally:
        close_gloo()


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_against_one_process(world):
    for rank, res in run_gloo(_worker, world, timeout=600).items():
        assert "error" not in res, (rank, res)
        bad = {k: v for k, v in res.items() if not v < 1e-11}
        assert not bad, (rank, bad)


def test_a_row_without_positive_is_an_error_on_every_rank():
    """(single process here: the check is all-reduced, so that every rank raises, or none)"""
    import fastcon.functional as FC

    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="no positive"):
        FC.clip_loss(x, y, 10.0, pair_mask=~torch.eye(4, dtype=torch.bool), backend="cpp")
