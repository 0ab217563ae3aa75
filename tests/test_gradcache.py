"""cached_step gives the gradients of one full-batch step, one micro-batch of activations at a time."""
import pytest
import torch
from torch import nn

import fastcon
import fastcon.functional as FC


class Towers(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(12, 16), nn.Dropout(dropout), nn.Linear(16, 8))
        self.text = nn.Sequential(nn.Linear(10, 16), nn.Dropout(dropout), nn.Linear(16, 8))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def encode(self, batch):
        images, texts = batch
        return (nn.functional.normalize(self.image(images), dim=-1),
                nn.functional.normalize(self.text(texts), dim=-1))


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_cached_step_matches_full_batch(dropout, loss_name):
    torch.manual_seed(0)
    model = Towers(dropout)
    images, texts = torch.randn(24, 12), torch.randn(24, 10)
    micro = [(images[i:i + 8], texts[i:i + 8]) for i in range(0, 24, 8)]

    def loss_fn(img, txt):
        if loss_name == "clip":
            return FC.clip_loss(img, txt, model.logit_scale.exp())
        return FC.siglip_loss(img, txt, model.logit_scale.exp(), -10.0)

    # Full batch, with the same dropout masks as the micro-batches draw them in order.
    torch.manual_seed(1)
    parts = [model.encode(b) for b in micro]
    full = loss_fn(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    full.backward()
    expected = _grads(model)
    model.zero_grad()

    torch.manual_seed(1)
    loss = fastcon.cached_step(model.encode, micro, loss_fn)
    assert loss.requires_grad is False
    torch.testing.assert_close(loss, full.detach(), rtol=1e-6, atol=1e-7)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


def test_cached_step_errors():
    with pytest.raises(ValueError, match="empty"):
        fastcon.cached_step(lambda b: b, [], lambda x: x.sum())
    with pytest.raises(TypeError, match="encode must return"):
        fastcon.cached_step(lambda b: "x", [1], lambda x: x.sum())


def test_cached_step_outputs_with_different_row_counts():
    torch.manual_seed(0)
    image = nn.Linear(6, 4)
    text = nn.Linear(5, 4)
    batches = [(torch.randn(2, 6), torch.randn(6, 5)) for _ in range(3)]  # 3 captions per image

    def encode(batch):
        return image(batch[0]), text(batch[1])

    def loss_fn(img, txt):
        return (img.repeat_interleave(3, dim=0) * txt).sum().pow(2)

    full = loss_fn(torch.cat([image(b[0]) for b in batches]), torch.cat([text(b[1]) for b in batches]))
    full.backward()
    expected = [p.grad.clone() for p in (*image.parameters(), *text.parameters())]
    for p in (*image.parameters(), *text.parameters()):
        p.grad = None
    fastcon.cached_step(encode, batches, loss_fn, preserve_rng=False)
    got = [p.grad for p in (*image.parameters(), *text.parameters())]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
