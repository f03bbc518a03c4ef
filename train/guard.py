"""Stop a run that has gone wrong without a NaN: a divergence guard over the loss and gradient norm.

A learning rate far too high does not always give NaN. With --lr 1e6 a run's gradient norm went
to 2.8e6 and then to exactly 0.0 (saturated softmax: no gradient at all), the loss frozen at one
value for the remaining 28 steps, and the run finished "done". The guard stops such runs:

- non-finite loss or gradient norm (NaN / inf), at any step;
- a stall: the gradient norm exactly 0, or the loss bit-for-bit unchanged from the previous
  step, for `stall_steps` steps in a row (real training moves the weights, so the loss of the
  next batch is never exactly the same float);
- a loss spike: loss > loss_factor x the median of the last WINDOW losses, and at least
  MARGIN nats above it (so the small wobbles of a nearly memorised run, where the median is
  tiny, never count);
- a gradient-norm spike: norm > grad_factor x the median of the last WINDOW norms.
Spikes are only judged after the warm-up and once MIN_HISTORY steps were seen. A factor or
stall_steps of 0 turns that check off. The defaults (loss x4, norm x1000, 10 steps) are far from
anything the project's runs show (tests/test_faults.py checks them on real curves).
"""
from __future__ import annotations

import math
import statistics
from collections import deque

WINDOW = 20
MIN_HISTORY = 5
MARGIN = 1.0


class DivergenceGuard:
    """check(step, loss, grad_norm) once per step, before the optimizer applies it."""

    def __init__(self, loss_factor: float = 4.0, grad_factor: float = 1000.0, stall_steps: int = 10,
                 warmup_steps: int = 0):
        self.loss_factor, self.grad_factor, self.stall_steps = loss_factor, grad_factor, stall_steps
        self.warmup_steps = warmup_steps
        self.losses: deque[float] = deque(maxlen=WINDOW)
        self.norms: deque[float] = deque(maxlen=WINDOW)
        self.zero_grad_run = 0  # consecutive steps with grad norm exactly 0
        self.same_loss_run = 0  # consecutive steps whose loss equals the previous step's
        self.previous_loss: float | None = None

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """None if the step looks healthy (and is recorded), else why the run should stop."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        reason = self._stall(step, loss, grad_norm) or self._spike(step, loss, grad_norm)
        if reason is None:
            self.losses.append(loss)
            self.norms.append(grad_norm)
        return reason

    def _stall(self, step: int, loss: float, grad_norm: float) -> str | None:
        self.zero_grad_run = self.zero_grad_run + 1 if grad_norm == 0.0 else 0
        self.same_loss_run = self.same_loss_run + 1 if loss == self.previous_loss else 0
        self.previous_loss = loss
        if not self.stall_steps:
            return None
        if self.zero_grad_run >= self.stall_steps:
            return (f"gradient norm has been exactly 0 since step {step - self.zero_grad_run + 1} "
                    f"({self.zero_grad_run} steps, loss {loss:.4g}): training stalled (--guard-stall-steps)")
        if self.same_loss_run >= self.stall_steps:
            return (f"loss has been exactly {loss!r} since step {step - self.same_loss_run} "
                    f"({self.same_loss_run + 1} steps): training stalled (--guard-stall-steps)")
        return None

    def _spike(self, step: int, loss: float, grad_norm: float) -> str | None:
        if step <= self.warmup_steps or len(self.losses) < MIN_HISTORY:
            return None
        loss_median, norm_median = statistics.median(self.losses), statistics.median(self.norms)
        if self.loss_factor and loss > self.loss_factor * loss_median and loss - loss_median > MARGIN:
            return (f"loss {loss:.4g} is {loss / loss_median:.1f}x the median {loss_median:.4g} of the last "
                    f"{len(self.losses)} steps (--guard-loss-factor {self.loss_factor:g})")
        if self.grad_factor and norm_median > 0 and grad_norm > self.grad_factor * norm_median:
            return (f"gradient norm {grad_norm:.4g} is {grad_norm / norm_median:.3g}x the median {norm_median:.4g} "
                    f"of the last {len(self.norms)} steps (--guard-grad-factor {self.grad_factor:g})")
        return None
