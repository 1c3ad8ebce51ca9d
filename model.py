"""The S8 network: one definition, the normalization chosen by name.

Layout (C = 3x3 conv + norm + ReLU, c = 1x1 transition conv, P = 2x2 max-pool):

    C1 C2 c3 P1 C4 C5 c6 P2 C7 C8 C9 GAP C10

Skip connections (identity adds, so they cost no parameters):
  1. C2's output is added to C1's: the first stage is a one-conv residual block at 32x32.
  2. C5's output is added to P1's output (c3, pooled): C4-C5 form a ResNet basic block at 16x16.
  3. C8's output is added to P2's output (c6, pooled): C7-C8 form a ResNet basic block at 8x8.
They sit where a layer's input and output have the same shape, i.e. right after each transition,
so the 1x1 transitions double as the projection that a ResNet would otherwise need, and every
stage gives gradients a short path to the stem. C9 is left plain so the head sees one more
non-linear mixing of the stage-3 features before pooling.
"""

import copy
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchsummary import summary

from utils import check_range
from variants import DEFAULT, canonical_norm, get_variant


def get_norm_layer(name, num_groups=4, group_size=None):
    """Return a constructor `norm(num_channels) -> nn.Module`, as timm's get_norm_layer does:
    the variant named (any alias, variants.py) with this network's group settings bound."""
    variant = get_variant(name)
    return lambda num_channels: variant.make_layer(num_channels, num_groups, group_size)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "celu": nn.CELU}


def get_activation(name):
    """The activation module class for `name` (relu, gelu, silu, celu); fail with the list."""
    key = str(name).strip().lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]


@dataclass
class ModelConfig:
    norm: str = DEFAULT        # normalization, by any name of variants.py
    num_groups: int = 4       # GroupNorm only: groups per layer; must divide every stage width
    group_size: int = 0       # GroupNorm only: groups of this many channels instead; 0: off
    widths: tuple = (16, 28, 32)  # channels at 32x32, 16x16 and 8x8
    dropout: float = 0.0      # Dropout2d rate after each 3x3 block; 0: off
    activation: str = "relu"  # after each norm: relu, gelu, silu or celu
    num_classes: int = 10     # logits

    def __post_init__(self):
        self.norm = canonical_norm(self.norm)
        get_activation(self.activation)  # an unknown name fails here, with the list
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths needs 3 positive stage widths, got {self.widths!r}")
        check_range(self, num_groups=(1, None), group_size=(0, None), dropout=(0, 1, "half"),
                    num_classes=(2, None))

    def to_dict(self):
        return asdict(self)


class ConvBlock(nn.Sequential):
    """3x3 conv -> norm -> activation [-> Dropout2d]. The conv has no bias where the norm's
    shift replaces it; without a norm (nn.Identity) it keeps one."""

    def __init__(self, name, c_in, c_out, norm_layer, dropout, activation=nn.ReLU):
        try:
            norm = norm_layer(c_out)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
        layers = [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=isinstance(norm, nn.Identity)),
            norm,
            activation(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Net(nn.Module):
    def __init__(self, config=None, **overrides):
        super().__init__()
        config = config or ModelConfig(**overrides)
        self.config = config
        w1, w2, w3 = config.widths
        norm = get_norm_layer(config.norm, config.num_groups, config.group_size or None)
        block = partial(ConvBlock, norm_layer=norm, dropout=config.dropout,
                        activation=get_activation(config.activation))

        self.C1 = block("C1", 3, w1)
        self.C2 = block("C2", w1, w1)
        self.c3 = nn.Conv2d(w1, w2, 1, bias=False)
        self.C4 = block("C4", w2, w2)
        self.C5 = block("C5", w2, w2)
        self.c6 = nn.Conv2d(w2, w3, 1, bias=False)
        self.C7 = block("C7", w3, w3)
        self.C8 = block("C8", w3, w3)
        self.C9 = block("C9", w3, w3)
        self.C10 = nn.Conv2d(w3, config.num_classes, 1)

    def forward(self, x):                      # x: (N, 3, 32, 32)
        x = self.C1(x)                         # (N, w1, 32, 32)
        x = x + self.C2(x)                     # skip 1
        x = F.max_pool2d(self.c3(x), 2)        # P1 -> (N, w2, 16, 16)
        x = x + self.C5(self.C4(x))            # skip 2
        x = F.max_pool2d(self.c6(x), 2)        # P2 -> (N, w3, 8, 8)
        x = x + self.C8(self.C7(x))            # skip 3
        x = self.C9(x)
        x = F.adaptive_avg_pool2d(x, 1)        # GAP -> (N, w3, 1, 1)
        return self.C10(x).flatten(1)          # (N, num_classes) logits

    def get_num_params(self, trainable_only=True):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def build_model(norm=ModelConfig.norm, seed=None, **config_overrides):
    """The one way notebooks, CLI and tests make a model; `seed` makes its init reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    return Net(ModelConfig(norm=norm, **config_overrides))


def show_summary(model, input_size=(3, 32, 32)):
    """torchsummary's table, computed on a CPU copy in eval mode.

    torchsummary runs a forward pass in whatever mode the model is in (train mode would update
    BatchNorm's running statistics) and only accepts "cpu"/"cuda"; a CPU eval copy leaves the
    real model untouched wherever it lives (cuda, mps, cpu).
    """
    probe = copy.deepcopy(model).to("cpu").eval()
    rng = torch.get_rng_state()  # summary draws its input from the global RNG; keep runs comparable
    summary(probe, input_size, device="cpu")
    torch.set_rng_state(rng)
