"""The optimizers a TrainConfig can ask for (`config.optimizer`), all under one learning-rate
schedule:

    sgd    SGD with Nesterov momentum: the recipe
    muon   Muon for the conv kernels of the 3x3 blocks C1 to C9 (torch.optim.Muon, on each
           kernel's (out, in*k*k) matrix; of a separable block, its 1x1 half), SGD as above for
           everything else (1x1 transitions, depthwise filters, norms, head)
    adamw  AdamW for everything, weight decay on conv weights only

Muon (Jordan et al., 2024) replaces a matrix's momentum by the nearest orthogonal matrix
(Newton-Schulz iterations), so every direction of the update moves at the same rate; it takes
2-D parameters only, hence the kernels' matrix views, which share the kernels' storage.
BatchedMuon computes torch.optim.Muon's step for all the matrices in one stack (on CUDA).
"""

import math

import torch
import torch.nn as nn

from model import ConvBlock

OPTIMIZERS = ("sgd", "muon", "adamw")
MUON_TORCH = "2.9"  # the first torch with torch.optim.Muon (requirements.txt says so too)


class KernelMatrix(nn.Parameter):
    """The (out, in*k*k) matrix view of a conv kernel, for optimizers of matrices: it shares
    the kernel's storage, so updating it updates the kernel. Its gradient is the kernel's, set
    the moment backward accumulates it (a hook), so that whatever reads the optimizer's
    gradients before its step (fp16's GradScaler unscaling them and looking for inf/NaN) reads
    this one too."""

    def __new__(cls, kernel):
        order = (0, 2, 3, 1) if kernel.is_contiguous(memory_format=torch.channels_last) \
            else (0, 1, 2, 3)  # a view needs the kernel's own memory order
        view = kernel.detach().permute(order).view(kernel.shape[0], -1)
        matrix = super().__new__(cls, view, requires_grad=True)
        matrix.kernel, matrix.order = kernel, order
        kernel.register_post_accumulate_grad_hook(lambda _: matrix.pull_grad())
        return matrix

    def pull_grad(self):
        grad = self.kernel.grad
        self.grad = None if grad is None else \
            grad.permute(self.order).reshape(self.kernel.shape[0], -1)


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic, its 5 steps, its eps


def newton_schulz(stack, coefficients=NS_COEFFICIENTS, steps=5, eps=1e-7):
    """torch.optim.Muon's orthogonalization of each (rows <= cols) matrix of `stack`, (B, R, C),
    in bf16: one batched matmul per product for all B matrices instead of one each."""
    a, b, c = coefficients
    x = stack.bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon for all its matrices at once: their gradients zero-padded into one stack
    (each turned wide, as Muon does), momentum and Nesterov's update computed in the stack's
    slices, one batched Newton-Schulz, then weight decay and the update's scale as
    torch.optim.Muon computes them (the tests compare the two step by step). torch's Muon loops
    over the matrices, about 25 operations each; this takes about 30 in all. Its state is
    torch's, one momentum buffer per matrix, so checkpoints move between the two.

    Without a host read: a rate may be a 0-d tensor (a schedule on the device), and under fp16
    GradScaler hands it the scale and the inf/NaN flag (`_step_supports_amp_scaling`), so it
    unscales, and leaves parameters and momentum as they were when the flag is set, on the
    device, instead of the scaler reading the flag back every step."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": nesterov, "ns_coefficients": ns_coefficients,
                                  "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": None})
        shapes = [tuple(p.shape) for g in self.param_groups for p in g["params"] if p.ndim != 2]
        if shapes:
            raise ValueError(f"Muon takes 2-D parameters only, got {shapes}")

    @torch.no_grad()
    def step(self, closure=None):
        # set by GradScaler.step for the duration of this call (fp16 only)
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step(group, params, scale, found_inf)

    def _step(self, group, params, scale=None, found_inf=None):
        lr, momentum = group["lr"], group["momentum"]
        grads = [p.grad for p in params]
        for p, g in zip(params, grads):
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        tall = [g.size(0) > g.size(1) for g in grads]
        wide = [g.mT if t else g for g, t in zip(grads, tall)]
        stack = grads[0].new_zeros(len(wide), max(w.size(0) for w in wide),
                                   max(w.size(1) for w in wide))
        slices = [stack[i, :w.size(0), :w.size(1)] for i, w in enumerate(wide)]
        torch._foreach_copy_(slices, wide)
        slices = [s.mT if t else s for s, t in zip(slices, tall)]  # the gradients' own shapes
        if found_inf is not None:  # fp16: unscaled; a skipped step's "gradient" is the momentum
            keep = 1 - found_inf     # itself, so that nothing moves (tensor weights: no host read)
            stack.mul_(keep / scale).nan_to_num_(0.0, 0.0, 0.0)
            torch._foreach_add_(slices, torch._foreach_mul(bufs, found_inf))
            lr = lr * keep
        torch._foreach_lerp_(bufs, slices, 1 - momentum)
        if group["nesterov"]:
            torch._foreach_lerp_(slices, bufs, momentum)
        else:
            torch._foreach_copy_(slices, bufs)
        ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        by_scale = {}  # torch's "original" adjustment: sqrt(max(1, rows / cols)) times the rate
        for i, p in enumerate(params):
            block = ortho[i, :wide[i].size(0), :wide[i].size(1)]
            same, blocks = by_scale.setdefault(math.sqrt(max(1, p.size(0) / p.size(1))), ([], []))
            same.append(p)
            blocks.append(block.mT if tall[i] else block)
        for adjust, (same, blocks) in by_scale.items():
            if isinstance(lr, torch.Tensor):  # alpha takes numbers only; fp32 as alpha's sums
                torch._foreach_addcmul_(same, blocks, [lr * -adjust] * len(blocks))
            else:
                torch._foreach_add_(same, blocks, alpha=-lr * adjust)


def block_convs(model):
    """The convolutions inside the network's 3x3 blocks (model.ConvBlock) whose weights train:
    C1's, and each separable block's depthwise and 1x1 halves."""
    return [conv for block in model.modules() if isinstance(block, ConvBlock)
            for conv in block.modules() if isinstance(conv, nn.Conv2d)
            and conv.weight.requires_grad]


def check_optimizer_available(name):
    """Fail in one line, before any data loads, where this torch lacks the optimizer `name`."""
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        raise ValueError(f"optimizer 'muon' needs torch {MUON_TORCH} or later (torch.optim.Muon); "
                         f"this is torch {torch.__version__}: upgrade (pip install -U "
                         f"'torch>={MUON_TORCH}') or pass --optimizer sgd")


class Chain(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one. Their param_groups are the
    chain's (shared, not copied), so one scheduler sets every group's rate and one GradScaler
    unscales and checks every gradient."""

    def __init__(self, *optimizers):  # no super().__init__: the parts hold the state
        self.optimizers = optimizers
        self.defaults, self.state = {}, {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        # fp16: where every part unscales and skips on the device, GradScaler lets them
        # (no host read of its inf/NaN flag per step)
        self._step_supports_amp_scaling = all(
            getattr(o, "_step_supports_amp_scaling", False) for o in optimizers)

    @property
    def param_groups(self):  # read each time: load_state_dict gives the parts new group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        scaling = {name: getattr(self, name) for name in ("grad_scale", "found_inf")
                   if hasattr(self, name)}  # set by GradScaler.step, as for one optimizer
        for optimizer in self.optimizers:
            for name, value in scaling.items():
                setattr(optimizer, name, value)
            try:
                optimizer.step()
            finally:
                for name in scaling:
                    delattr(optimizer, name)

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)
            for group in optimizer.param_groups:  # the kernels' own gradients accumulate too
                for p in group["params"]:
                    if isinstance(p, KernelMatrix):
                        p.kernel.grad = None

    def state_dict(self):
        return {"chain": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for optimizer, part in zip(self.optimizers, state["chain"]):
            optimizer.load_state_dict(part)


def make_optimizer(model, config, device="cpu", muon_depthwise=False, lr_multiples=None):
    """The optimizer `config.optimizer` names, over the parameters that train; weight decay on
    conv weights only (norm scales, shifts and biases gain nothing from it); on CUDA, SGD's
    fused kernel. For the lab's studies (lab/levers.py): `muon_depthwise` hands each layer's
    depthwise filters to Muon as one (channels, taps) matrix; `lr_multiples` {id(parameter):
    factor} puts parameters in groups at their own multiple of the rate."""
    check_optimizer_available(config.optimizer)
    trained = [p for p in model.parameters() if p.requires_grad]
    # a depthwise filter is one channel's 3x3 kernel, not a matrix mixing channels: SGD's
    kernels = {id(conv.weight) for conv in block_convs(model)
               if conv.groups == 1 or muon_depthwise}
    muon = [p for p in trained if id(p) in kernels] if config.optimizer == "muon" else []
    rest = [p for p in trained if all(p is not m for m in muon)]
    multiple = lr_multiples or {}  # 1 (or absent): the main groups
    main = [p for p in rest if multiple.get(id(p), 1) == 1]
    groups = [{"params": [p for p in main if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in main if p.ndim <= 1], "weight_decay": 0.0}]
    for factor in sorted({multiple.get(id(p), 1) for p in rest} - {1}):
        scaled = [p for p in rest if multiple.get(id(p), 1) == factor]
        for decayed in (True, False):
            part = [p for p in scaled if (p.ndim > 1) == decayed]
            if part:
                groups.append({"params": part, "lr": config.lr * factor,
                               "weight_decay": config.weight_decay if decayed else 0.0})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))
    fused = torch.device(device).type == "cuda"
    sgd = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True,
                          fused=fused or None)
    if fused:  # zero momentum buffers: fused SGD's own are left unwritten if fp16 skips step 1
        for p in (p for group in groups for p in group["params"]):
            sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)
    if not muon:
        return sgd
    # on CUDA one batched Newton-Schulz for every matrix, as the GPU waits on launches; on the
    # CPU torch's own, whose arithmetic the CPU studies' runs share (the two part in the last
    # digits within an epoch: docs/speed.md)
    muon_class = BatchedMuon if torch.device(device).type == "cuda" else torch.optim.Muon
    return Chain(sgd, muon_class([KernelMatrix(p) for p in muon], lr=config.muon_lr,
                                 momentum=config.momentum, nesterov=True,
                                 weight_decay=config.weight_decay))
