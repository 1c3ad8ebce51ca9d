"""The optimizers a TrainConfig can ask for (`config.optimizer`), all under one learning-rate
schedule:

    sgd    SGD with Nesterov momentum: the recipe
    muon   Muon for the 3x3 conv kernels (torch.optim.Muon, on each kernel's (out, in*3*3)
           matrix), SGD as above for everything else (1x1 convs, norms, head)
    adamw  AdamW for everything, weight decay on conv weights only

Muon (Jordan et al., 2024) replaces a matrix's momentum by the nearest orthogonal matrix
(Newton-Schulz iterations), so every direction of the update moves at the same rate; it takes
2-D parameters only, hence the kernels' matrix views, which share the kernels' storage.
"""

import torch
import torch.nn as nn

from norm_stats import norm_layers

OPTIMIZERS = ("sgd", "muon", "adamw")


class KernelMatrix(nn.Parameter):
    """The (out, in*k*k) matrix view of a conv kernel, for optimizers of matrices: it shares
    the kernel's storage, so updating it updates the kernel; `pull_grad` points its gradient at
    the kernel's before a step."""

    def __new__(cls, kernel):
        order = (0, 2, 3, 1) if kernel.is_contiguous(memory_format=torch.channels_last) \
            else (0, 1, 2, 3)  # a view needs the kernel's own memory order
        view = kernel.detach().permute(order).view(kernel.shape[0], -1)
        matrix = super().__new__(cls, view, requires_grad=True)
        matrix.kernel, matrix.order = kernel, order
        return matrix

    def pull_grad(self):
        grad = self.kernel.grad
        self.grad = None if grad is None else \
            grad.permute(self.order).reshape(self.kernel.shape[0], -1)


class Chain(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one. Their param_groups are the
    chain's (shared, not copied), so one scheduler sets every group's rate."""

    def __init__(self, *optimizers):  # no super().__init__: the parts hold the state
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.defaults, self.state = {}, {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    def step(self, closure=None):
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if isinstance(p, KernelMatrix):
                        p.pull_grad()
            optimizer.step()

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


def make_optimizer(model, config, device="cpu"):
    """The optimizer `config.optimizer` names, over the parameters that train; weight decay on
    conv weights only (norm scales, shifts and biases gain nothing from it), the norms' shifts
    at `norm_bias_lr` times the rate; on CUDA, SGD's fused kernel."""
    trained = [p for p in model.parameters() if p.requires_grad]
    shifts = {id(m.bias) for _, m in norm_layers(model) if getattr(m, "bias", None) is not None}
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)
               and m.kernel_size == (3, 3) and m.weight.requires_grad}
    muon = [p for p in trained if id(p) in kernels] if config.optimizer == "muon" else []
    rest = [p for p in trained if all(p is not m for m in muon)]
    fast = [p for p in rest if id(p) in shifts and config.norm_bias_lr != 1]
    groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in rest if p.ndim <= 1 and all(p is not f for f in fast)],
               "weight_decay": 0.0}]
    if fast:
        groups.append({"params": fast, "weight_decay": 0.0, "lr": config.lr * config.norm_bias_lr})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))
    sgd = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True,
                          fused=torch.device(device).type == "cuda" or None)
    if not muon:
        return sgd
    return Chain(sgd, torch.optim.Muon([KernelMatrix(p) for p in muon], lr=config.muon_lr,
                                       momentum=config.momentum, nesterov=True,
                                       weight_decay=config.weight_decay))
