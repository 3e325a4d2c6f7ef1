"""``Trainer(..., nvfp4=True)``: transformers' Trainer with NVFP4 training built in.

The model is converted before ``Trainer.__init__`` hands it to Accelerate (a callback's
``on_train_begin`` would be too late: DDP/FSDP have wrapped it by then). Everything else is
the stock Trainer: bf16, gradient accumulation and checkpointing, evaluation, logging,
``save_model`` and ``resume_from_checkpoint`` (the stochastic-rounding state lives in the
model's ``sr_state`` buffers, so a resumed run reproduces the uninterrupted one).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .callbacks import BypassCheckCallback, LateSwitchCallback, QuantTelemetryCallback
from .compile import (
    CUDA_GRAPH_MODES,
    compile_blocks,
    compiled_blocks_mode,
    step_begin,
    uses_cuda_graphs,
)
from .config import QUANT_METHOD, RECIPE_ENV, NVFP4Config, resolve_nvfp4
from .distributed import DATA_PARALLEL_ADVICE
from .hf_quantizer import prepare_model

logger = logging.getLogger(__name__)


@dataclass
class NVFP4TrainingArguments(transformers.TrainingArguments):
    """TrainingArguments with an ``nvfp4`` field (same values as ``Trainer(nvfp4=...)``)."""

    nvfp4: str | None = field(
        default=None,
        metadata={
            "help": "NVFP4 training: 'true', a recipe preset (nvfp4, mxfp4, fp8_block, bf16) "
            "or a path to a JSON/YAML NVFP4Config file. In Python also an NVFP4Config or dict."
        },
    )

    nvfp4_compile_blocks: str | None = field(
        default=None,
        metadata={
            "help": "compile each decoder block with this torch.compile mode "
            "(hf_nvfp4.compile_blocks); 'reduce-overhead' captures CUDA graphs, the fastest "
            "on a GPU. Not with torch_compile (that compiles the whole model)."
        },
    )

    def to_dict(self) -> dict[str, Any]:
        """As TrainingArguments.to_dict, with an NVFP4Config value turned into its dict."""
        d = super().to_dict()
        if isinstance(self.nvfp4, NVFP4Config):
            d["nvfp4"] = self.nvfp4.to_dict()
        return d


class NVFP4Trainer(transformers.Trainer):
    """A transformers Trainer that trains the model with NVFP4 GEMMs.

    Args:
        nvfp4: ``True``, an :class:`NVFP4Config`, a dict of its fields, a preset name or a
            path to a JSON/YAML recipe file. Falls back to ``args.nvfp4``, then to the
            ``HF_NVFP4_RECIPE`` environment variable (read here, once). A model loaded with
            ``quantization_config=NVFP4Config(...)`` is used as it is.
        compile_blocks: a ``torch.compile`` mode to compile each decoder block with
            (:func:`hf_nvfp4.compile_blocks`; ``"reduce-overhead"``: CUDA graphs, the
            configuration of our speed figures). Falls back to ``args.nvfp4_compile_blocks``.
            A model whose blocks were compiled that way before is recognised too: with CUDA
            graphs, each training and evaluation step starts a new graph step.
        All other arguments are transformers.Trainer's.

    With ``NVFP4Config(switch_to_bf16_at=...)`` the late precision switch is scheduled; with
    ``optimizer_moments`` set, AdamW keeps block-quantized moments
    (:class:`hf_nvfp4.optim.QuantizedAdamW`).
    """

    def __init__(
        self, model: nn.Module | None = None, args: transformers.TrainingArguments | None = None,
        *pargs: Any, nvfp4: bool | str | dict | NVFP4Config | os.PathLike | None = None,
        compile_blocks: str | None = None, **kwargs: Any,
    ) -> None:
        source = nvfp4 if nvfp4 is not None else getattr(args, "nvfp4", None)
        if source is None:
            source = os.environ.get(RECIPE_ENV)
        config = resolve_nvfp4(source)
        if model is not None:
            config = self._convert(model, config)
            from .checkpoint.load import exclude_packed_from_ddp

            exclude_packed_from_ddp(model)
        self.nvfp4_config = config
        mode = compile_blocks or getattr(args, "nvfp4_compile_blocks", None)
        if mode is not None:
            self._compile_blocks(model, args, mode)
        self._announce(config, chosen=source is not None)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if config is not None and not any(isinstance(c, BypassCheckCallback) for c in callbacks):
            callbacks.append(BypassCheckCallback())
        if config is not None and config.switch_to_bf16_at is not None:
            if not any(isinstance(c, LateSwitchCallback) for c in callbacks):
                callbacks.append(LateSwitchCallback(config.switch_to_bf16_at, config.switch_mode))
        super().__init__(model, args, *pargs, callbacks=callbacks, **kwargs)
        # compile_blocks marks the model, whether called above or by the user before
        compiled = compiled_blocks_mode(self.model) is not None or self.args.torch_compile
        if config is not None and not compiled:
            self._hint_compile(self.args.device)

    @staticmethod
    def _compile_blocks(model: nn.Module | None, args: Any, mode: str) -> None:
        """Compile the model's decoder blocks with ``mode``, refusing what conflicts with it."""
        if model is None:
            raise ValueError("hf_nvfp4.Trainer: compile_blocks needs the model at construction "
                             "(model_init is not supported with it)")
        if getattr(args, "torch_compile", False):
            raise ValueError(
                "hf_nvfp4.Trainer: compile_blocks / nvfp4_compile_blocks and "
                "TrainingArguments.torch_compile both compile the model; choose one "
                "(compile_blocks compiles each decoder block, torch_compile the whole model)"
            )
        if mode in CUDA_GRAPH_MODES and getattr(args, "gradient_checkpointing", False):
            raise ValueError(
                f"hf_nvfp4.Trainer: compile_blocks={mode!r} captures CUDA graphs, which "
                "gradient (activation) checkpointing, a block's forward recomputed inside the "
                "backward, does not run under; use mode 'default' or turn "
                "gradient_checkpointing / activation_checkpointing off"
            )
        n = compile_blocks(model, mode)
        print(f"hf_nvfp4.Trainer: compiled {n} decoder blocks (mode {mode!r})")

    def _graph_step(self) -> None:
        """A new CUDA-graph step before each forward when the blocks run in CUDA graphs."""
        if uses_cuda_graphs(self.model):
            step_begin()

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Trainer.training_step, starting a new CUDA-graph step first (see
        :meth:`_graph_step`)."""
        self._graph_step()
        return super().training_step(model, *args, **kwargs)

    def prediction_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Trainer.prediction_step, starting a new CUDA-graph step first."""
        self._graph_step()
        return super().prediction_step(model, *args, **kwargs)

    @staticmethod
    def _announce(config: NVFP4Config | None, chosen: bool) -> None:
        """One line saying whether this Trainer trains NVFP4 (a warning when nothing chose)."""
        if config is None and chosen:
            print("hf_nvfp4.Trainer: NVFP4 is off (nvfp4=False): training in high precision")
            return
        if config is None:
            logger.warning(
                "hf_nvfp4.Trainer: no NVFP4 config (nvfp4=, args.nvfp4 and $%s are unset): "
                "training in high precision like transformers.Trainer; pass nvfp4=True for "
                "NVFP4", RECIPE_ENV,
            )
            return
        recipe = config.get_recipe()
        print(f"hf_nvfp4.Trainer: training with NVFP4Config(recipe fprop/dgrad/wgrad = "
              f"{recipe.fprop_format}/{recipe.dgrad_format}/{recipe.wgrad_format}, "
              f"backend {config.backend!r})")

    @staticmethod
    def _hint_compile(device: torch.device) -> None:
        """For NVFP4 training on CUDA with eager decoder blocks: one line on how to train
        faster (nothing on other devices, where CUDA graphs do not exist)."""
        if device.type == "cuda":
            print("hf_nvfp4.Trainer: the decoder blocks run eager, where small models are "
                  "bound by the host time of the quantization ops; compile_blocks="
                  "'reduce-overhead' (or args.nvfp4_compile_blocks) runs them in CUDA graphs "
                  "(124M Llama on an H200: 1.8x the tokens/s)")

    @staticmethod
    def _convert(model: nn.Module, config: NVFP4Config | None) -> NVFP4Config | None:
        quantizer = getattr(model, "hf_quantizer", None)
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        if method == QUANT_METHOD:
            loaded = quantizer.quantization_config
            # ``switched`` is the model's state (a reloaded late switch), not a choice.
            if config is not None and {**config.to_dict(), "switched": None} != {
                **loaded.to_dict(), "switched": None
            }:
                raise ValueError(
                    "the model was loaded with an hf_nvfp4 quantization_config that differs "
                    "from the nvfp4= argument; pass only one of them"
                )
            return loaded
        if config is None:
            return None
        if isinstance(model, transformers.PreTrainedModel):
            prepare_model(model, config)
        else:
            from .convert import convert

            convert(model, config)
        return config

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Trainer's resume, plus the late switch the checkpoint was saved in (one taken by
        QuantTelemetryCallback's auto switch has no schedule that would redo it)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / "config.json"
        if self.nvfp4_config is None or not path.is_file():
            return
        saved = json.loads(path.read_text()).get("quantization_config") or {}
        if saved.get("quant_method") == QUANT_METHOD and saved.get("switched") is not None:
            from .schedule import switch_to_high_precision

            switch_to_high_precision(self.model, saved["switched"])

    def _wrap_model(self, model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        """Trainer's wrapping (where it picks ``torch.nn.DataParallel`` when one process sees
        several GPUs), refused up front for what cannot run in DataParallel's replicas:
        training with stochastic rounding, and experts modules whose forward is set on the
        instance (the replicas would share the original's, bound to its device)."""
        training = args[0] if args else kwargs.get("training", True)
        config = self.nvfp4_config
        if config is not None and self.args.n_gpu > 1:
            from .experts import has_instance_forward

            why = None
            if training and config.get_recipe().stochastic_rounding:
                why = DATA_PARALLEL_ADVICE
            elif has_instance_forward(model):
                why = ("The model's experts modules run a forward set on the instance, which "
                       "torch.nn.DataParallel's replicas would share with the original on "
                       "its device; run one process per GPU (accelerate launch, torchrun) or "
                       "make one GPU visible (CUDA_VISIBLE_DEVICES=0)")
            if why is not None:
                raise RuntimeError(
                    f"hf_nvfp4.Trainer: this process sees {self.args.n_gpu} GPUs, so "
                    f"transformers' Trainer would use torch.nn.DataParallel. {why}"
                )
        return super()._wrap_model(model, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer.log with the telemetry callback's pending statistics merged in."""
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, QuantTelemetryCallback):
                logs.update(cb.pop_metrics())
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The stock optimizer, or QuantizedAdamW when ``optimizer_moments`` is set."""
        config = self.nvfp4_config
        if config is None or config.optimizer_moments is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        from .optim import QuantizedAdamW, param_groups

        opt_model = (args[0] if args else kwargs.get("model")) or self.model
        decay = set(self.get_decay_parameter_names(opt_model))
        names = {id(p): n for n, p in opt_model.named_parameters()}
        groups = []
        for group in param_groups(opt_model):
            for wants_decay in (True, False):
                params = [p for p in group["params"] if (names[id(p)] in decay) == wants_decay]
                if params:
                    wd = self.args.weight_decay if wants_decay else 0.0
                    groups.append({**group, "params": params, "weight_decay": wd})
        fmt = config.optimizer_moments
        self.optimizer = QuantizedAdamW(
            groups,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            exp_avg_format=fmt,
            exp_avg_sq_format=fmt,
            seed=self.args.seed,
        )
        return self.optimizer


Trainer = NVFP4Trainer
