"""Trainer callbacks: the late precision switch, quantization telemetry and the check that
every quantized layer's matmul ran in its forward."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .bypass import bypassed_layers, forward_counts, warn_bypassed
from .schedule import PrecisionSchedule, switch_to_high_precision
from .telemetry import SQRT3, WGRAD_NOISE_RATIO, QuantProbe

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class LateSwitchCallback(TrainerCallback):
    """Switch NVFP4 layers to BF16 after ``switch_at`` of ``max_steps`` (the paper's recipe).

    ``mode="forward"`` switches only the forward GEMM, ``"all"`` every GEMM. On resume past
    the switch point the switch is re-applied at ``on_train_begin``.
    """

    def __init__(self, switch_at: float, mode: str = "all") -> None:
        self.switch_at, self.mode = switch_at, mode
        self.schedule: PrecisionSchedule | None = None

    def on_train_begin(  # noqa: D102
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        self.schedule = PrecisionSchedule(self.switch_at, max(state.max_steps, 1), self.mode)
        self._maybe_switch(model, state.global_step)

    def on_step_end(  # noqa: D102
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        self._maybe_switch(model, state.global_step)

    def _maybe_switch(self, model, step: int) -> None:
        if model is not None and self.schedule.update(_unwrap(model), step):
            logger.info("hf_nvfp4: switched to BF16 (%s) at step %d", self.mode, step)


class BypassCheckCallback(TrainerCallback):
    """At the first optimizer step, warn naming the quantized layers whose weight the model
    used outside their forward (that matmul ran in high precision; :mod:`hf_nvfp4.bypass`)."""

    def __init__(self) -> None:
        self.before: dict[str, int] | None = None
        self.checked = False

    def on_step_begin(  # noqa: D102
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if not self.checked and model is not None:
            self.before = forward_counts(_unwrap(model))

    def on_pre_optimizer_step(  # noqa: D102
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if self.checked or self.before is None or model is None:
            return
        self.checked = True
        inner = _unwrap(model)
        warn_bypassed(bypassed_layers(inner, self.before), type(inner).__name__)


class QuantTelemetryCallback(TrainerCallback):
    """Adds quantization statistics to Trainer's logs every ``every`` steps.

    Logged keys (means over the sampled NVFP4 layers): ``nvfp4/{x,w,dy}_{zero_frac,
    sat_frac,snr_db}`` and ``nvfp4/wgrad_noise_ratio``. With ``auto_switch``, the model
    switches to BF16 when that ratio falls below sqrt(3) or the loss exceeds
    ``spike_factor`` times its running mean.

    Under data parallelism each rank measures its own batch shard and the logged values are
    the means over ranks, so every rank takes the same switching decision.

    Args:
        every: telemetry period in optimizer steps (measurement costs a few reference
            quantizations of the sampled layers).
        max_layers: how many NVFP4 layers to sample (evenly spread).
        auto_switch: switch to BF16 when the criterion trips or the loss spikes.
        spike_factor: loss-spike threshold relative to the running mean loss.
    """

    def __init__(
        self,
        every: int = 50,
        max_layers: int = 4,
        auto_switch: bool = False,
        spike_factor: float = 1.5,
    ) -> None:
        if every < 1 or max_layers < 1:
            raise ValueError(f"every and max_layers must be >= 1; got {every}, {max_layers}")
        self.every, self.max_layers = every, max_layers
        self.auto_switch, self.spike_factor = auto_switch, spike_factor
        self.pending: dict[str, float] = {}
        self.switched_at: int | None = None
        self.probe = QuantProbe(max_layers)
        self._loss_mean: float | None = None

    def on_step_begin(  # noqa: D102
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if model is None or (state.global_step + 1) % self.every:
            return
        self.probe.start(model)

    def on_step_end(  # noqa: D102
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        stats = self.probe.finish(model)
        if stats:
            self.pending = stats
            ratio = stats.get(WGRAD_NOISE_RATIO)
            if self.auto_switch and ratio is not None and ratio < SQRT3:
                self._switch(model, state.global_step, f"wgrad noise ratio {ratio:.2f} < sqrt(3)")

    def on_log(  # noqa: D102
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, model: nn.Module | None = None, **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        loss = logs.get("loss")
        if loss is not None:
            if (
                self.auto_switch
                and self._loss_mean is not None
                and loss > self.spike_factor * self._loss_mean
            ):
                self._switch(model, state.global_step, f"loss spike {loss:.3f}")
            prev = loss if self._loss_mean is None else self._loss_mean
            self._loss_mean = 0.9 * prev + 0.1 * loss

    def pop_metrics(self) -> dict[str, float]:
        """The statistics of the last telemetry step, once (merged into logs by the Trainer)."""
        out, self.pending = self.pending, {}
        return out

    def _switch(self, model, step: int, why: str) -> None:
        if self.switched_at is not None or model is None:
            return
        switch_to_high_precision(_unwrap(model), "all")
        self.switched_at = step
        self.pending["nvfp4/switched_to_bf16"] = float(step)
        logger.warning("hf_nvfp4: switched to BF16 at step %d: %s", step, why)

