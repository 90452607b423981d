"""BEGAN (Berthelot et al. 2017): the auto-encoding discriminator whose encoder becomes the facial encoder.

The discriminator is ``D(v) = decoder(encoder(v))``; the generator is a second decoder fed with
``z ~ U(-1, 1)``.  :func:`began_step` implements the equilibrium objective exactly as in
``method.md``: ``L(v) = mean |v - D(v)|``, ``L_D = L(x) - k_t L(G(z))``, ``L_G = L(G(z))``,
``k_{t+1} = clip(k_t + lambda_k (gamma L(x) - L(G(z))), 0, 1)`` and the convergence measure
``M_global = L(x) + |gamma L(x) - L(G(z))|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from facial_perception.core.config import DecoderConfig, EncoderConfig, ModelConfig


def make_activation(name: str) -> nn.Module:
    """The configured non-linearity (ELU in BEGAN as in the reference implementations)."""
    if name == "elu":
        return nn.ELU(inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


class Encoder(nn.Module):
    """Table I: stages of 3x3 convs, strided 3x3 convs between stages, FC to the latent code."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = config.in_channels
        for index, (width, convs) in enumerate(config.stages):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1), make_activation(config.activation)]
                channels = width
            if index < len(config.stages) - 1:
                layers += [
                    nn.Conv2d(width, width, 3, stride=2, padding=1),
                    make_activation(config.activation),
                ]
        self.features = nn.Sequential(*layers)
        size = config.feature_size
        self.fc = nn.Linear(channels * size * size, config.latent_dim)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the map returned by :meth:`forward_features`."""
        size = self.config.feature_size
        return (self.config.feature_channels, size, size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map: the input of every task column."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The latent code (BEGAN bottleneck)."""
        return self.fc(self.forward_features(x).flatten(1))


class Decoder(nn.Module):
    """Table II: FC to ``C x s x s``, blocks of 3x3 convs with nearest x2 up-sampling, 3x3 conv to the image.

    The same topology serves as the discriminator's decoder and as the generator.
    """

    def __init__(
        self, config: DecoderConfig, latent_dim: int, output_size: int, out_channels: int = 1
    ) -> None:
        super().__init__()
        if output_size % config.base_size or (output_size // config.base_size) & (
            output_size // config.base_size - 1
        ):
            raise ValueError(f"decoder base_size {config.base_size} cannot reach {output_size} by doubling")
        self.config = config
        self.latent_dim = latent_dim
        self.output_size = output_size
        self.fc = nn.Linear(latent_dim, config.channels * config.base_size**2)
        layers: list[nn.Module] = []
        size = config.base_size
        while True:
            for _ in range(config.convs_per_block):
                layers += [
                    nn.Conv2d(config.channels, config.channels, 3, padding=1),
                    make_activation(config.activation),
                ]
            if size == output_size:
                break
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            size *= 2
        layers.append(nn.Conv2d(config.channels, out_channels, 3, padding=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, s = self.config.channels, self.config.base_size
        return self.blocks(self.fc(z).view(z.shape[0], c, s, s))


class BEGAN(nn.Module):
    """Discriminator auto-encoder (``encoder`` + ``decoder``) and a separate ``generator``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        self.encoder = Encoder(enc)
        self.decoder = Decoder(config.decoder, enc.latent_dim, enc.input_size, enc.in_channels)
        self.generator = Decoder(config.decoder, enc.latent_dim, enc.input_size, enc.in_channels)

    @property
    def latent_dim(self) -> int:
        return self.config.encoder.latent_dim

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters())

    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        """D(v): the discriminator is an auto-encoder."""
        return self.decoder(self.encoder(v))

    def sample_z(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        """z ~ U(-1, 1)^latent."""
        z = torch.empty(n, self.latent_dim, device=device)
        return z.uniform_(-1.0, 1.0, generator=generator)

    def generate(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
        return self.generator(self.sample_z(n, device, generator))


@dataclass
class BEGANState:
    """Equilibrium state carried between steps (and stored in BEGAN checkpoints)."""

    k: float = 0.0
    m_global: float = math.nan
    step: int = 0


def reconstruction_loss(v: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """L(v) = mean |v - D(v)| (pixel-wise L1)."""
    return (v - reconstruction).abs().mean()


def began_step(
    model: BEGAN,
    real: torch.Tensor,
    opt_d: torch.optim.Optimizer,
    opt_g: torch.optim.Optimizer,
    state: BEGANState,
    gamma: float = 0.5,
    lambda_k: float = 0.001,
    rng: torch.Generator | None = None,
) -> dict[str, float]:
    """One BEGAN update of discriminator and generator; updates ``state`` (k_t, M_global) in place.

    One discriminator forward on ``[x, G(z)]`` serves both losses (as in the reference
    implementations, both use the same D).  The two losses get separate backward passes restricted
    to their own parameters (``backward(inputs=...)``), so the generator loss never writes a
    gradient into the discriminator and the discriminator loss never into the generator.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    batch = real.shape[0]
    d_params = [p for p in model.discriminator_parameters() if p.requires_grad]
    g_params = [p for p in model.generator_parameters() if p.requires_grad]
    opt_d.zero_grad(set_to_none=True)
    opt_g.zero_grad(set_to_none=True)

    z = model.sample_z(batch, real.device, rng)
    fake = model.generator(z)
    both = torch.cat([real, fake], dim=0)
    recon = model.reconstruct(both)
    loss_real = reconstruction_loss(real, recon[:batch])
    loss_fake = reconstruction_loss(fake, recon[batch:])

    loss_d = loss_real - state.k * loss_fake
    loss_g = loss_fake
    # Discriminator: gradients only into encoder+decoder (the path through G is not accumulated).
    loss_d.backward(inputs=d_params, retain_graph=True)
    # Generator: gradients only into G; D receives nothing from this pass.
    loss_g.backward(inputs=g_params)
    opt_d.step()
    opt_g.step()

    real_value, fake_value = float(loss_real.detach()), float(loss_fake.detach())
    balance = gamma * real_value - fake_value
    state.k = min(max(state.k + lambda_k * balance, 0.0), 1.0)
    state.m_global = real_value + abs(balance)
    state.step += 1
    return {
        "loss_d": float(loss_d.detach()),
        "loss_g": fake_value,
        "k": state.k,
        "m_global": state.m_global,
        "loss_real": real_value,
        "loss_fake": fake_value,
    }


def make_began_optimizers(
    model: BEGAN, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.999)
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """The two Adam optimizers of BEGAN (beta1 = 0.5, as in the reference implementations)."""
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=lr, betas=betas)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=lr, betas=betas)
    return opt_d, opt_g
