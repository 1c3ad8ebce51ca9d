"""The whole training step as one CUDA graph: forward, loss, backward, both optimizers, the
learning-rate schedule and the epoch's running sums captured once and replayed per batch, so
that the GPU no longer waits on the host for about 160 launches a step (docs/speed.md, "What
one training step costs"). A lab path until a GPU run shows it faster than eager with the same
accuracy; `python -m lab.bench --variants repo+wholestep` measures it.

    step = WholeStep(model, optimizer, DeviceSchedule(optimizer, total_steps, pct_start), ...)
    for x, y in loader:
        step(x, y)                 # eager for WARMUP_STEPS, then captured and replayed on CUDA
    loss, acc = step.epoch_means()

Capturable means that no step reads a device value on the host or takes a number that changes
from step to step: the rates are 0-d tensors set on the device (DeviceSchedule), the optimizers
take the fp16 scale and inf flag as tensors (optimizers.py), and the step counter of the NaN
guard lives on the device. Off CUDA, or where capture fails (one warning), the same step runs
eagerly, which is how the CPU tests check it against utils.training_step and LambdaLR.
"""

import warnings

import torch

from precision import first_line
from utils import one_cycle, training_step

WARMUP_STEPS = 3  # eager steps on a side stream before capture, as PyTorch's CUDA notes ask


class DeviceSchedule:
    """utils.one_cycle on the device: every param group's rate becomes a 0-d tensor, set from a
    step counter on the device, so no host reads or writes a number per step (a captured graph
    replays it). The same factors as make_scheduler's LambdaLR, in fp32."""

    def __init__(self, optimizer, total_steps, pct_start, start=0.1, end=0.001):
        self.groups = optimizer.param_groups
        device = self.groups[0]["params"][0].device
        self.base = [float(g.get("initial_lr", g["lr"])) for g in self.groups]
        self.warmup = max(1, round(pct_start * total_steps))
        self.decay_steps = max(1, total_steps - self.warmup)
        self.start, self.end = start, end
        self.step_count = torch.zeros((), device=device)
        for group, base in zip(self.groups, self.base):
            group["lr"] = torch.tensor(base * one_cycle(0, total_steps, pct_start, start, end),
                                       device=device)

    def factor(self):
        step = self.step_count
        rising = self.start + (1 - self.start) * step / self.warmup
        done = ((step - self.warmup) / self.decay_steps).clamp(max=1)
        falling = (1 - done) + self.end * done  # not 1 + (end - 1) * done: exact at the end
        return torch.where(step < self.warmup, rising, falling)

    def step(self):
        self.step_count += 1
        factor = self.factor()
        for group, base in zip(self.groups, self.base):
            group["lr"].copy_(factor * base)


class WholeStep:
    """utils.training_step plus the schedule and train_one_epoch's running sums, on static
    input buffers; on CUDA captured as one graph after WARMUP_STEPS eager steps and replayed
    for every later batch of the same shape (a last smaller batch runs eagerly)."""

    def __init__(self, model, optimizer, schedule, precision="fp32", scaler=None,
                 label_smoothing=0.0, capture=True):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.precision, self.scaler, self.label_smoothing = precision, scaler, label_smoothing
        device = next(model.parameters()).device
        self.capture = capture and device.type == "cuda"
        self.graph, self.failed, self.calls = None, False, 0
        self.x = self.y = None
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none

    def __call__(self, x, y):
        if self.x is None or self.x.shape != x.shape:
            if self.x is not None:  # another shape: this batch runs eagerly
                return self._step(x, y)
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.x.copy_(x)
        self.y.copy_(y)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture or self.failed:
            self._step(self.x, self.y)
        elif self.calls <= WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(self.x, self.y)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._capture_and_replay()

    def _step(self, x, y):
        self.model.train()  # what a replay runs too: the graph was captured in train mode
        loss, hits = training_step(self.model, x, y, self.optimizer, self.precision,
                                   self.scaler, self.label_smoothing)
        self.schedule.step()
        self.steps += 1
        self.seen += len(y)
        bad = ~torch.isfinite(loss) & (self.first_bad_step == 0)
        self.first_bad_step.copy_(torch.where(bad, self.steps, self.first_bad_step))
        self.loss_sum += loss * len(y)
        self.correct += hits

    def _capture_and_replay(self):
        graph = torch.cuda.CUDAGraph()
        try:
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates them in the pool
            with torch.cuda.graph(graph):
                self._step(self.x, self.y)
        except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
            self.failed = True
            reason = first_line(err)
            warnings.warn(f"capturing the training step failed ({type(err).__name__}: "
                          f"{reason}); running eagerly", RuntimeWarning, stacklevel=3)
            self._step(self.x, self.y)  # nothing of a failed capture ran
            return
        self.graph = graph
        graph.replay()  # capture records the step; replay runs it for this batch

    def epoch_means(self):
        """(mean loss, accuracy) of the images seen since the last call, and which step's loss
        was first NaN/inf (0: none): three host reads, once an epoch."""
        seen = int(self.seen)
        result = (float(self.loss_sum) / seen, int(self.correct) / seen, int(self.first_bad_step))
        for total in (self.loss_sum, self.correct, self.seen, self.steps, self.first_bad_step):
            total.zero_()
        return result
