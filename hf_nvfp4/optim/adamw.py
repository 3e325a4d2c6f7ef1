"""AdamW with block-quantized moments ("FP4 All the Way"): FP32 math, packed storage."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hf_nvfp4.distributed import rank
from hf_nvfp4.numerics.rng import draw_seed

from .groups import DEFAULT_MIN_QUANTIZED_NUMEL
from .state import STATE_FORMATS, MomentCodec, load, packed_nbytes, restore_dtypes, store

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), else ``t`` itself."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


class QuantizedAdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored block-quantized; the update itself is FP32.

    Each step, per parameter: decode ``m`` and ``v`` to FP32, apply exactly the update of
    ``torch.optim.AdamW`` (``foreach=False``: decoupled decay, ``lerp`` for ``m``,
    bias-corrected ``m / (sqrt(v) / sqrt(bc2) + eps)``) to the FP32 (master) parameter, then
    re-quantize both moments with freshly computed block scales. With both formats ``None``
    the optimizer is bitwise identical to ``torch.optim.AdamW(foreach=False)``.

    Numerics choices (measured in ``bench/optim.py`` and ``tests/optim``):

    * **Stochastic rounding** for both moments: with ``beta2 = 0.999`` a step changes ``v``
      by 0.1%, far below one E2M1 step (17-50%); round-to-nearest would return the old code
      every step and freeze the moment. Stochastic rounding keeps ``E[q] = x``.
    * **The second moment is stored as** ``sqrt(v)`` (``sqrt_second_moment=True``): the
      update divides by ``sqrt(v)``, so quantizing it puts the (unbiased) error directly in
      the denominator, and it halves the dynamic range in bits: within a block, ``v`` down
      to ``amax / 144`` (instead of ``amax / 12``) keeps a nonzero E2M1 code.
    * **Underflow guard:** a positive second moment never decodes to 0 (zero codes of
      positive inputs are raised to the block's smallest positive code), and ``eps`` stays
      in the denominator. Without it a small ``v`` in a block with a large one decodes to 0,
      and the next update is ``m / (sqrt((1 - beta2) g^2) + eps)``, about 30x too large.
      The floor can only shrink such updates.

    Which parameters are quantized: those of groups with ``quantize=True`` (the default)
    holding at least ``min_quantized_numel`` elements (the global size for DTensors); the
    others keep FP32 moments. :func:`hf_nvfp4.optim.param_groups` builds groups that also
    keep norms and embeddings in FP32.

    FSDP2: a DTensor parameter is updated through its local shard (``p._local_tensor``);
    blocks run over the flattened local shard, the state holds plain local tensors (each rank
    saves its own shard's packed state) and the stochastic-rounding seed mixes in the rank.

    Stochastic rounding draws from a CPU generator reseeded per parameter and step from
    ``(seed, step, parameter index, rank)`` (one seed for ``m``, then one for ``v``), so a
    resumed run (saved ``step`` counters) rounds exactly as an uninterrupted one and no RNG
    state needs saving.

    Non-finite moments: when a gradient makes a quantized parameter's new moments NaN or
    infinite (a NaN/Inf gradient, or ``|g|`` above ~1.8e19 so that ``g**2`` overflows), that
    parameter, its moments and its step counter are left unchanged, the other parameters are
    updated, and :meth:`step` raises ``ValueError`` naming the skipped ones (a block scale of
    a non-finite moment would corrupt the whole tensor). Parameters with FP32 moments follow
    ``torch.optim.AdamW`` and propagate NaN.

    Fused step: with both moments in NVFP4 (``sqrt_second_moment``, stochastic rounding, 1x16
    blocks or square tiles) each CUDA parameter is updated by two Triton kernels
    (:mod:`hf_nvfp4.kernels.adamw`) instead of ~40 PyTorch ops; the numerics are the same up
    to multiply-add contraction in the last bit of FP32 values.

    Args:
        params: parameters or parameter groups (groups may set ``quantize=False``).
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: denominator term (>= 0).
        weight_decay: decoupled weight decay (>= 0).
        exp_avg_format: signed format of the first moment, one of
            ``"nvfp4" | "mxfp4" | "fp8_block" | "mxfp8"``, or ``None`` for FP32.
        exp_avg_sq_format: format of the second moment (stored unsigned in value), or None.
        sqrt_second_moment: store ``sqrt(v)`` rather than ``v``.
        square_tiles: one block scale per ``block x block`` consecutive elements (NVFP4:
            1.01 instead of 1.13 bytes of state per parameter) instead of per ``block``.
        rounding: ``"stochastic"`` or ``"nearest"`` for the re-quantization.
        min_quantized_numel: smaller parameters keep FP32 moments.
        seed: base seed of the stochastic rounding.
        fused: use the fused Triton step for FP32 CUDA parameters (``None``: whenever the
            formats allow it and Triton is available; ``True``: raise if they do not;
            CPU parameters use it only under ``TRITON_INTERPRET=1``, for tests).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        exp_avg_format: str | None = "nvfp4",
        exp_avg_sq_format: str | None = "nvfp4",
        sqrt_second_moment: bool = True,
        square_tiles: bool = False,
        rounding: str = "stochastic",
        min_quantized_numel: int = DEFAULT_MIN_QUANTIZED_NUMEL,
        seed: int = 0,
        fused: bool | None = None,
    ) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        for name, fmt in (
            ("exp_avg_format", exp_avg_format),
            ("exp_avg_sq_format", exp_avg_sq_format),
        ):
            if fmt is not None and fmt not in STATE_FORMATS:
                raise ValueError(f"{name} must be one of {STATE_FORMATS} or None; got {fmt!r}")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic'; got {rounding!r}")
        if min_quantized_numel < 0:
            raise ValueError(f"min_quantized_numel must be >= 0; got {min_quantized_numel}")
        self.codecs: dict[str, MomentCodec | None] = {
            "exp_avg": None
            if exp_avg_format is None
            else MomentCodec(exp_avg_format, rounding, square_tiles=square_tiles),
            "exp_avg_sq": None
            if exp_avg_sq_format is None
            else MomentCodec(
                exp_avg_sq_format,
                rounding,
                sqrt=sqrt_second_moment,
                floor_nonzero=True,
                square_tiles=square_tiles,
            ),
        }
        self.min_quantized_numel = min_quantized_numel
        self.seed = seed
        self._cpu_generator = torch.Generator()
        self.fused = _resolve_fused(fused, exp_avg_format, exp_avg_sq_format,
                                    sqrt_second_moment, rounding)
        self._interpret_fused = fused is True
        # Work buffers of the fused step, per parameter; not optimizer state (not saved).
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, quantize=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for p in group["params"]:
                if torch.is_complex(p):
                    raise TypeError(
                        f"QuantizedAdamW does not support complex parameters; got a parameter "
                        f"of dtype {p.dtype} and shape {tuple(p.shape)}"
                    )

    def _codec(self, name: str, p: torch.Tensor, group: dict) -> MomentCodec | None:
        if not group["quantize"] or p.numel() < self.min_quantized_numel:
            return None
        return self.codecs[name]

    def _generator(self, step: int, index: int) -> torch.Generator:
        seed = _splitmix64(_splitmix64(_splitmix64(self.seed) ^ step) ^ index) ^ rank()
        return self._cpu_generator.manual_seed(seed & ((1 << 63) - 1))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimizer step; ``closure`` re-evaluates the model and returns the loss.

        Raises ``ValueError`` after the step if some parameters' moments would have become
        non-finite; those were left unchanged (see the class docstring).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        skipped: list[int] = []
        fused: list[tuple[int, torch.Tensor, int]] = []  # (index, parameter, step)
        for group in self.param_groups:
            _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for p in group["params"]:
                if p.grad is not None:
                    outcome = self._update(p, group, index)
                    if outcome == "fused":
                        fused.append((index, p, int(self.state[p]["step"].item())))
                    elif outcome == "skipped":
                        skipped.append(index)
                index += 1
        if fused:
            from hf_nvfp4.kernels.adamw import step_was_finite

            finite = step_was_finite([self._scratch[p] for _, p, _ in fused],
                                     [k for _, _, k in fused])
            for (index, p, _), ok in zip(fused, finite, strict=True):
                if not ok:
                    self.state[p]["step"] -= 1
                    skipped.append(index)
        if skipped:
            raise ValueError(
                f"QuantizedAdamW: the gradients of parameter(s) {sorted(skipped)} (indices in "
                "param_groups order) made their new moments NaN or infinite (a NaN/Inf "
                "gradient, or |grad| above ~1.8e19); those parameters and their optimizer "
                "state were left unchanged, the other parameters were updated"
            )
        return loss

    def _update(self, p: torch.Tensor, group: dict, index: int) -> str:
        """Update one parameter; returns ``"done"``, ``"fused"`` (launched; the caller checks
        that its moments were finite) or ``"skipped"`` (non-finite moments, nothing changed)."""
        if p.grad.is_sparse:
            raise RuntimeError(
                f"QuantizedAdamW does not support sparse gradients; parameter {index} "
                f"(shape {tuple(p.shape)}) got a {p.grad.layout} gradient"
            )
        param, grad = _local(p), _local(p.grad)
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        codecs = {n: self._codec(n, p, group) for n in ("exp_avg", "exp_avg_sq")}
        state = self.state[p]
        if not state:
            self._scratch.pop(p, None)  # a reset state must not see the old step's amaxes
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for name, codec in codecs.items():
                zeros = torch.zeros_like(param, dtype=torch.float32)
                if codec is None:
                    state[name] = zeros
                else:
                    store(state, name, codec, zeros, None)
        state["step"] += 1
        step = state["step"].item()

        if self.fused and all(codecs.values()) and _fusable(param, self._interpret_fused):
            from hf_nvfp4.kernels.adamw import fused_adamw_nvfp4_, new_scratch

            gen = self._generator(int(step), index)
            m_seed, v_seed = draw_seed(gen), draw_seed(gen)
            scratch = self._scratch.get(p)
            if scratch is None:
                scratch = self._scratch[p] = new_scratch(param.device)
            fused_adamw_nvfp4_(param, grad, state, scratch, lr=lr, beta1=beta1, beta2=beta2,
                               eps=eps, weight_decay=wd, step=int(step), m_seed=m_seed,
                               v_seed=v_seed, square_tiles=codecs["exp_avg"].square_tiles)
            return "fused"

        master = param if param.dtype == torch.float32 else param.float()
        grad = grad if grad.dtype == torch.float32 else grad.float()
        moments = {}
        for name, codec in codecs.items():
            if codec is None:
                moments[name] = state[name]
            else:
                moments[name] = load(state, name, codec, param.numel()).view_as(param)
        quantized = [(n, c) for n, c in codecs.items() if c is not None]

        # The arithmetic of torch.optim.AdamW's single-tensor path, op for op (the moments
        # out of place first, so that non-finite ones can leave everything unchanged).
        exp_avg = moments["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = moments["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        new = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if quantized and not all(bool(torch.isfinite(new[n]).all()) for n, _ in quantized):
            state["step"] -= 1
            return "skipped"
        for name, codec in codecs.items():
            if codec is None:
                state[name].copy_(new[name])
        if wd != 0:
            master.mul_(1 - lr * wd)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        master.addcdiv_(exp_avg, denom, value=-step_size)
        if master is not param:
            param.copy_(master)

        if quantized:
            gen = None
            if any(c.rounding == "stochastic" for _, c in quantized):
                gen = self._generator(int(step), index)
            for name, codec in quantized:
                store(state, name, codec, new[name], gen)
        return "done"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, keeping the packed dtypes.

        ``torch.optim.Optimizer`` casts floating state tensors to the parameter dtype; the
        codes and scales are cast back here (exactly: they are small integers and E4M3/FP32
        values) as copies, so that later steps never write into ``state_dict``. Raises
        ``ValueError`` when a saved state does not match this optimizer's formats.
        """
        super().load_state_dict(state_dict)
        self._scratch.clear()  # its amax pairs follow the old step counters
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                # torch keeps the loaded step tensor itself; the step increments it in place.
                state["step"] = state["step"].clone()
                for name in ("exp_avg", "exp_avg_sq"):
                    codec = self._codec(name, p, group)
                    saved_fp32 = name in state
                    if saved_fp32 != (codec is None):
                        raise ValueError(
                            f"saved optimizer state stores {name!r} "
                            f"{'in FP32' if saved_fp32 else 'quantized'} for a parameter of "
                            f"shape {tuple(p.shape)}, but this optimizer's format for it is "
                            f"{None if codec is None else codec.fmt!r}"
                        )
                    if codec is None:
                        state[name] = state[name].float()
                    else:
                        restore_dtypes(state, name, codec, _local(p).numel())

    def state_nbytes(self) -> int:
        """Bytes of all stored optimizer state tensors (packed codes, scales, step counters)."""
        return sum(packed_nbytes(s) for s in self.state.values())


def _resolve_fused(fused: bool | None, exp_avg_format: str | None,
                   exp_avg_sq_format: str | None, sqrt_second_moment: bool,
                   rounding: str) -> bool:
    """Whether the fused Triton step is used (see :class:`QuantizedAdamW`'s ``fused``)."""
    if fused is False:
        return False
    supported = (exp_avg_format == exp_avg_sq_format == "nvfp4" and sqrt_second_moment
                 and rounding == "stochastic")
    if not supported:
        if fused:
            raise ValueError(
                "fused=True needs exp_avg_format = exp_avg_sq_format = 'nvfp4', "
                "sqrt_second_moment=True and rounding='stochastic'; got "
                f"{exp_avg_format!r}, {exp_avg_sq_format!r}, {sqrt_second_moment}, {rounding!r}"
            )
        return False
    from hf_nvfp4.kernels import is_triton_available

    available, reason = is_triton_available()
    if fused and not available:
        raise RuntimeError(f"fused=True needs Triton: {reason}")
    return available


def _fusable(param: torch.Tensor, interpret: bool) -> bool:
    """A parameter the fused kernels can update in place: contiguous FP32 on CUDA, or on the
    CPU under Triton's interpreter when ``interpret`` (``fused=True``, for tests)."""
    if param.dtype != torch.float32 or not param.is_contiguous():
        return False
    if param.is_cuda:
        return True
    from hf_nvfp4.kernels import interpreting

    return interpret and interpreting()


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if isinstance(lr, torch.Tensor):
        raise TypeError("lr must be a Python float; tensor learning rates are not supported")
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0; got {lr}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1); got {betas}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
