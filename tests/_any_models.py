"""Models and steps of other shapes of training (SPEC §8), shared by test_any_loop*.py and the DDP worker: a Hugging
Face style model, a two-input model with its batch adapter, a contrastive two-pass step, and a GAN."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TinyTextClassifier(nn.Module):
    """forward(input_ids, attention_mask, labels=None) -> ModelOutput(loss, logits), as a Hugging Face model."""

    def __init__(self, vocab: int = 20, dim: int = 8, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = nn.Embedding(vocab, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor = None) -> Any:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embeddings(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.classifier(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)


def text_batches(n: int = 6, batch: int = 4, seed: int = 1) -> List[Dict[str, torch.Tensor]]:
    """Tokenized batches as a Hugging Face data collator gives them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = (torch.rand(batch, 5, generator=gen) > 0.2).long()
        mask[:, 0] = 1
        out.append({"input_ids": torch.randint(0, 20, (batch, 5), generator=gen), "attention_mask": mask,
                    "labels": torch.randint(0, 3, (batch,), generator=gen)})
    return out


class ImageMaskNet(nn.Module):
    """Two inputs: forward(image, mask)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Linear(6, 8)
        self.mask = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.image(image) + self.mask(mask)))


def image_mask_batches(n: int = 6, batch: int = 4, seed: int = 2) -> List[Tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=gen), (torch.rand(batch, 6, generator=gen) > 0.5).float(),
             torch.randint(0, 3, (batch,), generator=gen)) for _ in range(n)]


def image_mask_adapter(batch: Tuple[torch.Tensor, ...]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    image, mask, target = batch
    return {"image": image, "mask": mask}, target


def contrastive_step(context: Any) -> torch.Tensor:
    """Two passes over two views of the batch; an InfoNCE loss between them (SimCLR's shape of step)."""
    x = context.inputs
    z1 = F.normalize(context.net(x), dim=1)
    z2 = F.normalize(context.net(x.flip(1) * 0.9), dim=1)
    logits = z1 @ z2.t() / 0.5
    context.preds = z1
    return F.cross_entropy(logits, torch.arange(len(x)))


class GAN(nn.Module):
    """A generator and a discriminator in one module: checkpoints hold both, unprefixed."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


def gan_losses(net: nn.Module, real: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The discriminator's loss on real and (detached) fake data, and the fake data."""
    fake = net.generator(torch.randn(real.shape[0], 4))
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
    d_loss = F.binary_cross_entropy_with_logits(net.discriminator(real), ones) \
        + F.binary_cross_entropy_with_logits(net.discriminator(fake.detach()), zeros)
    return d_loss, fake, ones


def gan_step(context: Any) -> Dict[str, torch.Tensor]:
    """mmedit's loop: one discriminator update, then one generator update, per batch."""
    net = context.net
    d_loss, fake, ones = gan_losses(net, context.inputs)
    context.optimizers["discriminator"].update(d_loss)
    g_loss = F.binary_cross_entropy_with_logits(net.discriminator(fake), ones)
    context.optimizers["generator"].update(g_loss)
    return {"d_loss": d_loss, "g_loss": g_loss}


GAN_OPTIMIZERS = {
    "discriminator": {"optimizer": "Adam", "initial_lr": 2e-3, "params": "discriminator",
                      "optimizer_params": {"betas": [0.5, 0.999]}},
    "generator": {"optimizer": "Adam", "initial_lr": 1e-3, "params": "generator",
                  "optimizer_params": {"betas": [0.5, 0.999]}},
}


def real_batches(n: int = 4, batch: int = 8, seed: int = 3) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=gen) * 0.5 + 1.0, torch.zeros(batch)) for _ in range(n)]


def hand_gan(epochs: int, batches: List[Tuple[torch.Tensor, torch.Tensor]], accumulate: int = 1,
             seed: int = 42) -> GAN:
    """The same GAN training written out by hand (as the PyTorch DCGAN example, with SuperGradients' Adam default
    weight_decay 1e-4): the generator's loss trains no discriminator weight, and with accumulation each loss is
    divided by its window's size."""
    net = GAN()
    opt_d = torch.optim.Adam(net.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    opt_g = torch.optim.Adam(net.generator.parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    torch.manual_seed(seed)
    for _ in range(epochs):
        for index, (real, _) in enumerate(batches):
            window = min(accumulate, len(batches) - (index - index % accumulate))
            stepping = (index + 1) % accumulate == 0 or index + 1 == len(batches)
            d_loss, fake, ones = gan_losses(net, real)
            (d_loss / window if window > 1 else d_loss).backward()
            if stepping:
                opt_d.step()
                opt_d.zero_grad()
            g_loss = F.binary_cross_entropy_with_logits(net.discriminator(fake), ones)
            kept = [None if p.grad is None else p.grad.clone() for p in net.discriminator.parameters()]
            (g_loss / window if window > 1 else g_loss).backward()
            for param, grad in zip(net.discriminator.parameters(), kept):
                param.grad = grad  # what the generator's loss added to the discriminator is thrown away
            if stepping:
                opt_g.step()
                opt_g.zero_grad()
    return net
