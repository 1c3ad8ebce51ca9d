"""The lab's network and training loop: the course's (model.Net, utils.fit) with the switches
the studies measured, all off by default. LabNet builds its blocks through Net's hooks;
LabTrainConfig's hooks() gives fit the lab's steps (utils.Hooks). At their defaults they are the
course's, parameter for parameter and step for step (tests/test_levers.py); `python -m
lab.train` takes train.py's flags plus one per field below.

Switches no study ever set are gone rather than moved (dropout, torch.compile, Lookahead's
alpha: they last ran at commit 188e130); files that recorded them off read the same
(checkpoints.OFF_VALUES).
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model import (ConvBlock, ModelConfig, Net, SeparableConv2d, build_model, check_choice,
                   check_range, get_norm_layer)
from norm_stats import fixed_batch, norm_layers
from optimizers import block_convs, make_optimizer
from utils import Hooks, TrainConfig, make_loaders

IDENTITY_INITS = ("off", "skipinit", "dirac")
STAGES = (("C2",), ("C4", "C5"), ("C7", "C8", "C9"))  # the square 3x3 blocks of each stage
# Where the identity adds sit: the 3x3 blocks whose output gets the branch's input added (a
# branch starts after the previous add, or at the stage's input).
SKIP_LAYOUTS = {
    "blocks": ("C2", "C5", "C8"),                                   # the course's network
    "per-conv": tuple(name for stage in STAGES for name in stage),  # one conv per branch
    "off": (),                                                      # a plain chain
}


@dataclass
class LabModelConfig(ModelConfig):
    group_size: int = 0       # GroupNorm only: groups of this many channels instead; 0: off
    identity_init: str = "off"  # residual branches start as identity: off, skipinit (a gain
                                # from 0 on each branch) or dirac (3x3 convs plus identity)
    weight_std: bool = False  # standardize every filter of the 3x3 blocks (Weight Standardization)
    weight_std_depthwise: bool = True  # with weight_std, the depthwise filters too (zero-mean
                                       # taps: none can average its neighbourhood)
    skips: str = "blocks"     # where the identity adds sit: blocks, per-conv or off
    depthwise_kernel: int = 3  # separable only: the depthwise filters' size (3 or 5; odd)
    depthwise_dilation: int = 1  # separable only: the depthwise filters' dilation (2: a 5x5
                                 # view from 3x3 taps, no parameters added)
    se_hidden: int = 0        # squeeze-and-excitation on each residual branch (C2, C5, C8)
                              # through this many hidden units; 0: off

    def __post_init__(self):
        super().__post_init__()
        check_range(self, group_size=(0, None), depthwise_kernel=(1, 7),
                    depthwise_dilation=(1, 4), se_hidden=(0, None))
        check_choice(self, identity_init=IDENTITY_INITS, skips=SKIP_LAYOUTS)
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


class StdConv2d(nn.Conv2d):
    """A convolution whose filters are standardized (mean 0, std 1 over each output channel's
    inputs and taps) in every forward pass (Qiao et al., 2019): the partner of batch-free norms."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False).add(1e-5).sqrt()
        return self._conv_forward(x, (w - mean) / std, self.bias)


class WideSeparableConv2d(SeparableConv2d):
    """The course's separable block with the depthwise filters' view widened (a larger kernel,
    or dilated taps) and either conv standardized."""

    def __init__(self, c_in, c_out, bias=False, conv=nn.Conv2d, depthwise_conv=nn.Conv2d,
                 kernel=3, dilation=1):
        reach = dilation * (kernel - 1) // 2  # padding that keeps the size
        nn.Sequential.__init__(self, depthwise_conv(c_in, c_in, kernel, padding=reach,
                                                    dilation=dilation, groups=c_in, bias=False),
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


class LabNet(Net):
    """Net with LabModelConfig's switches: the blocks built through Net's hooks (norm_layer,
    conv3x3), the adds placed by SKIP_LAYOUTS, optional gains and gates on the branches."""

    def __init__(self, config=None, **overrides):
        super().__init__(config or LabModelConfig(**overrides))
        config = self.config
        # SkipInit: a learnable gain from 0 on each branch, so each skip add first passes its
        # input alone; a zeroed norm scale would not do, a ReLU after it passes no gradient back
        self.branch_gains = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(())) for name in SKIP_LAYOUTS[config.skips]}
        ) if config.identity_init == "skipinit" else None
        w1, w2, w3 = config.widths
        widths = {"C2": w1, "C5": w2, "C8": w3}
        self.excite = nn.ModuleDict(
            {name: SqueezeExcite(widths[name], config.se_hidden)
             for name in SKIP_LAYOUTS["blocks"]}) if config.se_hidden else None
        init_identity(self, config.identity_init)

    def norm_layer(self, num_channels):
        config = self.config
        return get_norm_layer(config.norm, config.num_groups, config.group_size or None)(
            num_channels)

    def conv3x3(self, name, c_in, c_out, bias):
        config = self.config
        conv = StdConv2d if config.weight_std else nn.Conv2d
        if name == "C1" or config.conv == "full":
            return conv(c_in, c_out, 3, padding=1, bias=bias)
        return WideSeparableConv2d(
            c_in, c_out, bias=bias, conv=conv,
            depthwise_conv=conv if config.weight_std_depthwise else nn.Conv2d,
            kernel=config.depthwise_kernel, dilation=config.depthwise_dilation)

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


@torch.no_grad()
def init_identity(model, how):
    """"dirac": add an identity kernel to every 3x3 conv with as many outputs as inputs
    (Zagoruyko & Komodakis, 2017; airbench); "skipinit" is built by LabNet, as its branch gains."""
    if how == "dirac":
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and \
                    conv.in_channels == conv.out_channels:
                conv.weight.add_(nn.init.dirac_(torch.empty_like(conv.weight)))


build_lab_model = partial(build_model, net=LabNet)  # model.build_model making a LabNet


WHITEN_MODES = ("off", "frozen", "trainable")


@dataclass
class LabTrainConfig(TrainConfig):
    ema_decay: float = 0.0        # evaluate an EMA of the weights with this decay per step; 0: off
    whiten: str = "off"           # C1 whitens 3x3 patches of training images: off, frozen, trainable
    norm_bias_lr: float = 1.0     # the norms' shifts learn at this multiple of `lr`
    freeze_norm_scale: bool = False  # the norms' scales stay at 1
    alternate_flip: bool = False  # each image flipped in every other epoch instead of at random
    muon_depthwise: bool = False  # Muon for the depthwise filters too (a layer's as one matrix)
    depthwise_lr: float = 1.0     # the depthwise filters learn at this multiple of `lr` (not Muon's)
    lookahead: int = 0            # Lookahead: sync with the slow weights every this many steps; 0: off

    def __post_init__(self):
        super().__post_init__()
        check_range(self, ema_decay=(0, 1, "half"), norm_bias_lr=(0, None, "open"),
                    depthwise_lr=(0, None, "open"), lookahead=(0, None))
        check_choice(self, whiten=WHITEN_MODES)
        if self.muon_depthwise and self.optimizer != "muon":
            raise ValueError(f"muon_depthwise needs optimizer 'muon', got {self.optimizer!r}; "
                             f"add --optimizer muon or leave --muon-depthwise out")
        if self.muon_depthwise and self.depthwise_lr != 1:
            raise ValueError("depthwise_lr scales `lr` for the depthwise filters, which "
                             "muon_depthwise hands to Muon: pass one of the two")

    def hooks(self):
        return LabHooks(self)


class LabHooks(Hooks):
    """LabTrainConfig's steps in utils.fit: whitening and frozen scales before training, the
    alternating flips, the optimizer's lever groups and Lookahead, the EMA of the weights."""

    def __init__(self, config):
        self.config, self.ema = config, None

    def prepare(self, model, data):
        config = self.config
        if config.whiten != "off" or config.freeze_norm_scale:  # the training split's images only
            prepare_for_training(model, config, fixed_batch(
                data.train_x, data.train_y, data.mean, data.std, "cpu", per_class=500)[0])
        self.ema = make_ema(model, config.ema_decay)

    def make_loaders(self, data, config, device, channels_last):
        return make_loaders(data, config, device, channels_last,
                            alternate_flip=config.alternate_flip)

    def make_optimizer(self, model, config, device):
        shifts = {id(m.bias) for _, m in norm_layers(model) if getattr(m, "bias", None) is not None}
        depthwise = {id(conv.weight) for conv in block_convs(model) if conv.groups > 1}
        multiples = {**{i: config.depthwise_lr for i in depthwise},
                     **{i: config.norm_bias_lr for i in shifts}}
        optimizer = make_optimizer(model, config, device, config.muon_depthwise, multiples)
        return Lookahead(optimizer, config.lookahead) if config.lookahead else optimizer

    def after_step(self, model):
        if self.ema is not None:
            self.ema.update_parameters(model)

    def eval_model(self, model):
        return model if self.ema is None else self.ema.module

    def finish(self, model):
        if self.ema is not None:  # the caller gets the weights that were evaluated
            model.load_state_dict(self.ema.module.state_dict())

    def state_dict(self):
        return None if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state):
        if self.ema is not None:
            self.ema.load_state_dict(state)


def make_ema(model, decay):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm's running
    statistics move with their weights), or None when `decay` is 0."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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
    """C1's filters set by patch_whitening of `images` (the training split's, never validation
    or test images), frozen unless config.whiten is "trainable"; the norms' scales frozen at 1
    with config.freeze_norm_scale."""
    if config.whiten != "off":
        conv = model.C1[0]
        conv.weight.copy_(patch_whitening(images, conv.out_channels).to(conv.weight))
        conv.weight.requires_grad_(config.whiten == "trainable")
    if config.freeze_norm_scale:
        for block in model.modules():
            if isinstance(block, ConvBlock) and getattr(block[1], "weight", None) is not None:
                block[1].weight.requires_grad_(False)


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al., 2019): every `k` steps of `optimizer` (the fast weights), the slow
    weights move `alpha` of the way towards the fast ones and the fast ones restart from there,
    which damps the oscillation of a high learning rate. Shares `optimizer`'s param_groups, so a
    scheduler over this one sets the rates of that one."""

    def __init__(self, optimizer, k=5, alpha=0.5):  # no super().__init__: `optimizer` holds it
        self.optimizer, self.k, self.alpha, self.steps = optimizer, k, alpha, 0
        self.defaults, self.state = {}, {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self.slow = [p.detach().clone() for p in self._params()]

    @property
    def param_groups(self):  # read each time: load_state_dict gives `optimizer` new group dicts
        return self.optimizer.param_groups

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.k == 0:
            for slow, fast in zip(self.slow, self._params()):
                slow.lerp_(fast, self.alpha)
                fast.copy_(slow)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"inner": self.optimizer.state_dict(), "slow": self.slow, "steps": self.steps}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["inner"])
        for slow, saved in zip(self.slow, state["slow"]):
            slow.copy_(saved)
        self.steps = state["steps"]
