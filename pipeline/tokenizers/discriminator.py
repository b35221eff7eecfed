"""taming-transformers' PatchGAN discriminator and the adversarial half of its VQGAN loss.

`NLayerDiscriminator` keeps taming's module names (`main.N.*`, the `loss.discriminator.main.*`
keys of the official checkpoints) and its `weights_init`. The helpers reproduce
`VQLPIPSWithDiscriminator`: hinge loss for the discriminator, `-mean(logits_fake)` for the
generator, and the adaptive weight that balances the generator term against the reconstruction
term by their gradient norms at the decoder's last layer. `disc_factor` is taming's
`adopt_weight`: 0 before `disc_start`, 1 from it on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weights_init(module: nn.Module) -> None:
    """taming's init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0."""
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix): x (B, input_nc, H, W) -> logits (B, 1, H', W') per patch.

    Kernel 4, padding 1; `n_layers` stride-2 convolutions (the first without norm), one stride-1
    convolution, then a 1-channel stride-1 head. Convolutions followed by BatchNorm have no bias.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        kw, padw = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 (mean relu(1 - real) + mean relu(1 + fake)), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term: -mean(logits on reconstructions), a scalar."""
    return -logits_fake.mean()


def disc_factor(step: int, disc_start: int, factor: float = 1.0) -> float:
    """taming's `adopt_weight`: `factor` from step `disc_start` on, 0 before."""
    return factor if step >= disc_start else 0.0


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float,
) -> torch.Tensor:
    """taming's `calculate_adaptive_weight`: ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped
    to [0, 1e4], times `disc_weight`; detached scalar. `last_layer` is the decoder's last
    weight (`decoder.conv_out.weight`); both losses must still have their graphs."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight
