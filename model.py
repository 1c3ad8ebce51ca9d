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

Each 3x3 block after C1 is separable by default (`ModelConfig.conv`): a depthwise 3x3 conv (one
3x3 filter per channel) and a pointwise 1x1 conv (MobileNet; Howard et al., 2017), about
9c + c^2 weights instead of 9c^2, so the same 50,000 parameters buy stages of 32, 64 and 88
channels instead of 16, 28 and 32 (the learning-per-epoch study's win; `conv="full"` with
`widths=(16, 28, 32)` is the network of recipes v1 and v2). C1 stays a full conv: a depthwise
filter on an RGB image would see each colour alone. The lever study (docs/levers.md) widens the
depthwise filters' view (`depthwise_kernel`, `depthwise_dilation`) and gates the three residual
branches by squeeze-and-excitation (`se_hidden`); all off by default.

`ModelConfig.skips` moves the adds for the study of where they sit (SKIP_LAYOUTS): "per-conv"
makes every square 3x3 conv its own residual branch (C2, C4, C5, C7, C8, C9), "off" removes
them (the plain chain, to measure what they buy). Adds cost no parameters, so every layout has
the same parameter count; `identity_init="skipinit"` adds one learnable gain per branch.
"""

import copy
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchsummary import summary

from variants import DEFAULT, canonical_norm, get_variant


def get_norm_layer(name, num_groups=4, group_size=None):
    """Return a constructor `norm(num_channels) -> nn.Module`, as timm's get_norm_layer does:
    the variant named (any alias, variants.py) with this network's group settings bound."""
    variant = get_variant(name)
    return lambda num_channels: variant.make_layer(num_channels, num_groups, group_size)


def check_range(config, **bounds):
    """One line per setting out of its range, before anything loads: {field: (low, high[, how])}
    with None for no bound, how "open" (low excluded) or "half" (high excluded)."""
    for field, (low, high, *how) in bounds.items():
        value = getattr(config, field)
        open_low, open_high = how == ["open"], how == ["half"]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and (low is None or (value > low if open_low else value >= low)) \
            and (high is None or (value < high if open_high else value <= high))
        if not ok:
            where = " and ".join(filter(None, [
                low is not None and f"{'above' if open_low else 'at least'} {low}",
                high is not None and f"{'below' if open_high else 'at most'} {high}"]))
            raise ValueError(f"{field} must be {where}, got {value!r}")


def check_choice(config, **choices):
    """One line per setting that is none of its accepted names: {field: names}."""
    for field, accepted in choices.items():
        if getattr(config, field) not in accepted:
            raise ValueError(f"{field} must be one of {', '.join(accepted)}, got "
                             f"{getattr(config, field)!r}")


IDENTITY_INITS = ("off", "skipinit", "dirac")
CONVS = ("full", "separable")
STAGES = (("C2",), ("C4", "C5"), ("C7", "C8", "C9"))  # the square 3x3 blocks of each stage
# Where the identity adds sit: the 3x3 blocks whose output gets the branch's input added (a
# branch starts after the previous add, or at the stage's input).
SKIP_LAYOUTS = {
    "blocks": ("C2", "C5", "C8"),                              # the default: see the docstring
    "per-conv": tuple(name for stage in STAGES for name in stage),  # one conv per branch
    "off": (),                                                 # a plain chain
}
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
    widths: tuple = (32, 64, 88)  # channels at 32x32, 16x16 and 8x8
    dropout: float = 0.0      # Dropout2d rate after each 3x3 block; 0: off
    activation: str = "silu"  # after each norm: relu, gelu, silu or celu
    num_classes: int = 10     # logits
    identity_init: str = "off"  # residual branches start as identity: off, skipinit (a gain
                                # from 0 on each branch) or dirac (3x3 convs plus identity)
    weight_std: bool = False  # standardize every filter of the 3x3 blocks (Weight Standardization)
    weight_std_depthwise: bool = True  # with weight_std, the depthwise filters too (zero-mean
                                       # taps: none can average its neighbourhood)
    skips: str = "blocks"     # where the identity adds sit: blocks, per-conv or off
    conv: str = "separable"   # the 3x3 blocks after C1: separable (depthwise + 1x1) or full
    depthwise_kernel: int = 3  # separable only: the depthwise filters' size (3 or 5; odd)
    depthwise_dilation: int = 1  # separable only: the depthwise filters' dilation (2: a 5x5
                                 # view from 3x3 taps, no parameters added)
    se_hidden: int = 0        # squeeze-and-excitation on each residual branch (C2, C5, C8)
                              # through this many hidden units; 0: off

    def __post_init__(self):
        self.norm = canonical_norm(self.norm)
        get_activation(self.activation)  # an unknown name fails here, with the list
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths needs 3 positive stage widths, got {self.widths!r}")
        check_range(self, num_groups=(1, None), group_size=(0, None), dropout=(0, 1, "half"),
                    num_classes=(2, None), depthwise_kernel=(1, 7), depthwise_dilation=(1, 4),
                    se_hidden=(0, None))
        check_choice(self, identity_init=IDENTITY_INITS, skips=SKIP_LAYOUTS, conv=CONVS)
        if self.identity_init == "dirac" and self.conv == "separable":
            raise ValueError("identity_init dirac needs conv full: a depthwise-plus-1x1 block "
                             "has no single kernel to start as the identity")
        if not self.weight_std_depthwise and not (self.weight_std and self.conv == "separable"):
            raise ValueError("weight_std_depthwise off needs weight_std on and conv separable: "
                             "only then are there depthwise filters to leave unstandardized")
        if self.depthwise_kernel % 2 == 0:
            raise ValueError(f"depthwise_kernel must be odd (a centred filter keeps the map's "
                             f"size), got {self.depthwise_kernel}")
        if (self.depthwise_kernel, self.depthwise_dilation) != (3, 1) and self.conv != "separable":
            raise ValueError("depthwise_kernel and depthwise_dilation need conv separable: a "
                             "full conv has no depthwise filters")
        if self.se_hidden and self.skips != "blocks":
            raise ValueError("se_hidden needs skips blocks: squeeze-and-excitation gates the "
                             "branches that end at C2, C5 and C8")
        if self.identity_init == "skipinit" and not SKIP_LAYOUTS[self.skips]:
            raise ValueError("identity_init skipinit needs skip connections (skips blocks or "
                             "per-conv): without them there is no branch to gate")

    def to_dict(self):
        return asdict(self)


class StdConv2d(nn.Conv2d):
    """A convolution whose filters are standardized (mean 0, std 1 over each output channel's
    inputs and taps) in every forward pass (Qiao et al., 2019): the partner of batch-free norms."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False).add(1e-5).sqrt()
        return self._conv_forward(x, (w - mean) / std, self.bias)


class SeparableConv2d(nn.Sequential):
    """A depthwise conv (one filter per input channel; 3x3 by default) then a pointwise 1x1
    conv: a 3x3 conv factorized into its spatial and its channel-mixing part (MobileNet).
    `depthwise_kernel`/`depthwise_dilation` widen the depthwise filters' view."""

    def __init__(self, c_in, c_out, kernel_size=3, padding=1, bias=False, conv=nn.Conv2d,
                 depthwise_conv=None, depthwise_kernel=3, depthwise_dilation=1):
        depthwise_conv = depthwise_conv or conv
        reach = depthwise_dilation * (depthwise_kernel - 1) // 2  # padding that keeps the size
        super().__init__(depthwise_conv(c_in, c_in, depthwise_kernel, padding=reach,
                                        dilation=depthwise_dilation, groups=c_in, bias=False),
                         conv(c_in, c_out, 1, bias=bias))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): each channel scaled by a gate in (0, 1) that
    a two-layer bottleneck computes from every channel's global average."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):                          # x: (N, C, H, W)
        squeezed = F.adaptive_avg_pool2d(x, 1)     # (N, C, 1, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(squeezed))))


class ConvBlock(nn.Sequential):
    """3x3 conv -> norm -> activation [-> Dropout2d]. The conv has no bias where the norm's
    shift replaces it; without a norm (nn.Identity) it keeps one."""

    def __init__(self, name, c_in, c_out, norm_layer, dropout, activation=nn.ReLU,
                 conv=nn.Conv2d):
        try:
            norm = norm_layer(c_out)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
        layers = [
            conv(c_in, c_out, 3, padding=1, bias=isinstance(norm, nn.Identity)),
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
        conv = StdConv2d if config.weight_std else nn.Conv2d
        block = partial(ConvBlock, norm_layer=norm, dropout=config.dropout,
                        activation=get_activation(config.activation), conv=conv)
        depthwise = conv if config.weight_std_depthwise else nn.Conv2d
        square = block if config.conv == "full" else partial(  # C2 ... C9
            block, conv=partial(SeparableConv2d, conv=conv, depthwise_conv=depthwise,
                                depthwise_kernel=config.depthwise_kernel,
                                depthwise_dilation=config.depthwise_dilation))

        self.C1 = block("C1", 3, w1)  # always full: a depthwise filter per RGB channel sees no colour
        self.C2 = square("C2", w1, w1)
        self.c3 = nn.Conv2d(w1, w2, 1, bias=False)
        self.C4 = square("C4", w2, w2)
        self.C5 = square("C5", w2, w2)
        self.c6 = nn.Conv2d(w2, w3, 1, bias=False)
        self.C7 = square("C7", w3, w3)
        self.C8 = square("C8", w3, w3)
        self.C9 = square("C9", w3, w3)
        self.C10 = nn.Conv2d(w3, config.num_classes, 1)
        # SkipInit: a learnable gain from 0 on each branch, so each skip add first passes its
        # input alone; a zeroed norm scale would not do, a ReLU after it passes no gradient back
        self.branch_gains = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(())) for name in SKIP_LAYOUTS[config.skips]}
        ) if config.identity_init == "skipinit" else None
        widths = {"C2": w1, "C5": w2, "C8": w3}
        self.excite = nn.ModuleDict(
            {name: SqueezeExcite(widths[name], config.se_hidden)
             for name in SKIP_LAYOUTS["blocks"]}) if config.se_hidden else None
        init_identity(self, config.identity_init)

    def forward(self, x):                      # x: (N, 3, 32, 32)
        stage1, stage2, stage3 = STAGES
        x = self._stage(self.C1(x), stage1)    # C2 (+ skip) -> (N, w1, 32, 32)
        x = F.max_pool2d(self.c3(x), 2)        # P1 -> (N, w2, 16, 16)
        x = self._stage(x, stage2)             # C4 C5 (+ skip)
        x = F.max_pool2d(self.c6(x), 2)        # P2 -> (N, w3, 8, 8)
        x = self._stage(x, stage3)             # C7 C8 (+ skip) C9
        x = F.adaptive_avg_pool2d(x, 1)        # GAP -> (N, w3, 1, 1)
        return self.C10(x).flatten(1)          # (N, num_classes) logits

    def _stage(self, x, blocks):
        """Run a stage's square 3x3 blocks, adding each residual branch's input at its end."""
        branch_input, ends = x, SKIP_LAYOUTS[self.config.skips]
        for name in blocks:
            x = getattr(self, name)(x)
            if self.excite is not None and name in self.excite:
                x = self.excite[name](x)
            if name in ends:
                if self.branch_gains is not None:
                    x = self.branch_gains[name] * x
                x = branch_input = x + branch_input
        return x

    def get_num_params(self, trainable_only=True):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def init_identity(model, how):
    """"dirac": add an identity kernel to every 3x3 conv with as many outputs as inputs
    (Zagoruyko & Komodakis, 2017; airbench); "skipinit" is built by Net, as its branch gains."""
    if how == "dirac":
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and \
                    conv.in_channels == conv.out_channels:
                conv.weight.add_(nn.init.dirac_(torch.empty_like(conv.weight)))


@torch.no_grad()
def patch_whitening(images, num_filters, eps=5e-4):
    """(num_filters, C, 3, 3) filters that whiten the 3x3 patches of `images` (normalized,
    (N, C, H, W)): the top num_filters/2 eigenvectors of the patches' covariance, each scaled by
    1/sqrt(eigenvalue + eps), and their negatives (so ReLU keeps both signs)."""
    if num_filters % 2:
        raise ValueError(f"patch whitening needs an even number of filters, got {num_filters}")
    c = images.shape[1]
    patches = images.double().unfold(2, 3, 1).unfold(3, 3, 1)   # (N, C, H-2, W-2, 3, 3)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 9)
    covariance = torch.cov(patches.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)      # ascending
    top = eigenvectors[:, -(num_filters // 2):].T / (eigenvalues[-(num_filters // 2):, None]
                                                     + eps).sqrt()
    return torch.cat([top, -top]).view(num_filters, c, 3, 3).float()


@torch.no_grad()
def prepare_for_training(model, config, images):
    """What a TrainConfig asks of the model before training: C1's filters set by
    patch_whitening of `images` (the training split's, never validation or test images),
    frozen unless config.whiten is "trainable"; the norms' scales frozen at 1."""
    if config.whiten != "off":
        conv = model.C1[0]
        conv.weight.copy_(patch_whitening(images, conv.out_channels).to(conv.weight))
        conv.weight.requires_grad_(config.whiten == "trainable")
    if config.freeze_norm_scale:
        for block in model.modules():
            if isinstance(block, ConvBlock) and getattr(block[1], "weight", None) is not None:
                block[1].weight.requires_grad_(False)


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
