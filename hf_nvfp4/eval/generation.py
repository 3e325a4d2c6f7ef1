"""Batched generation with ``model.generate``: KV cache, left padding, stop strings.

Prompts are sorted by length (longest first, so an out-of-memory error shows at once) and
cut into batches; each batch is left-padded so all prompts end at the same position. A
stopping criterion ends each sequence once its *generated* text contains a stop string (the
prompt's own ``Question:`` lines do not count), and the returned text is cut before it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode.

    Args:
        max_new_tokens: tokens generated at most per completion.
        num_samples: completions per prompt; 1 with ``temperature == 0`` is greedy.
        temperature: 0 for greedy, else the sampling temperature.
        top_p: nucleus sampling mass when sampling.
        seed: seed for sampling, set once before generating.
    """

    max_new_tokens: int = 256
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0


class StopOnStrings(StoppingCriteria):
    """Stop each sequence when its generated text contains any of ``stops``.

    Only a window of recent tokens is decoded per step, wide enough for the longest stop
    string even when a token is a single byte.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_length: int
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_length = prompt_length
        self.window = 4 * max(len(s.encode("utf-8")) for s in stops) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [any(s in tail for s in self.stops) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _prompt_budget(limit: int | None, max_new_tokens: int) -> int | None:
    """Prompt tokens kept in a context of ``limit``: the context minus ``max_new_tokens``, but
    at least half of it (generation is cut instead, see :func:`generate`); None when the
    context is unknown."""
    return None if limit is None else max(limit - max_new_tokens, limit // 2, 1)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    stops: Sequence[str],
    config: GenerationConfig,
    batch_size: int = 8,
    desc: str = "generate",
    progress: bool = True,
) -> list[list[str]]:
    """Complete every prompt; returns ``config.num_samples`` texts per prompt, in order.

    Within the model's context (``max_position_embeddings``): a prompt keeps its last
    ``max(context - max_new_tokens, context // 2)`` tokens, and a batch generates at most
    what fits after its longest prompt; both are logged as warnings when they happen.
    The completions are decoded together with their prompts and the prompt text removed,
    so tokenizers that strip a leading space when decoding (SentencePiece) keep it.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = config.temperature > 0
    if config.num_samples > 1 and not sampling:
        raise ValueError(f"num_samples={config.num_samples} needs temperature > 0")
    decoding = {"do_sample": False}
    if sampling:
        torch.manual_seed(config.seed)
        decoding = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
    limit = getattr(model.config, "max_position_embeddings", None)
    budget = _prompt_budget(limit, config.max_new_tokens)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if budget is not None:
        cut = sum(len(ids) > budget for ids in encoded)
        if cut:
            logger.warning("%s: %d of %d prompts longer than %d tokens keep their last %d "
                           "(context %d, max_new_tokens %d)", desc, cut, len(encoded), budget,
                           budget, limit, config.max_new_tokens)
        encoded = [ids[-budget:] for ids in encoded]
    capped = 0
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        input_ids = padded["input_ids"].to(device)
        criteria = StoppingCriteriaList()
        if stops:
            criteria.append(StopOnStrings(tokenizer, stops, input_ids.shape[1]))
        new_tokens = config.max_new_tokens
        if limit is not None and input_ids.shape[1] + new_tokens > limit:
            new_tokens = limit - input_ids.shape[1]
            capped += len(batch)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=padded["attention_mask"].to(device),
            max_new_tokens=new_tokens,
            num_return_sequences=config.num_samples,
            stopping_criteria=criteria,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **decoding,
        )
        for j, text in enumerate(_completions(tokenizer, out, input_ids.shape[1])):
            results[batch[j // config.num_samples]].append(truncate_at_stop(text, stops))
        bar.update(len(batch))
    bar.close()
    if capped:
        logger.warning("%s: %d of %d prompts could generate fewer than max_new_tokens=%d "
                       "tokens (context %d)", desc, capped, len(prompts), config.max_new_tokens,
                       limit)
    return results


def _completions(tokenizer: PreTrainedTokenizerBase, out: torch.Tensor,
                 prompt_width: int) -> list[str]:
    """The generated text of each row of ``out`` (left-padded prompt + generation): the
    whole row decoded minus its decoded prompt, or, where the decoded prompt is not a prefix
    of the whole, the generated tokens decoded alone."""
    full = tokenizer.batch_decode(out, skip_special_tokens=True)
    prompts = tokenizer.batch_decode(out[:, :prompt_width], skip_special_tokens=True)
    return [f[len(p):] if f.startswith(p)
            else tokenizer.decode(row[prompt_width:], skip_special_tokens=True)
            for f, p, row in zip(full, prompts, out, strict=True)]
