"""Log-likelihood of continuations given contexts, batched: for references and choices.

Tokenisation follows lm-evaluation-harness: trailing whitespace of the context moves to the
continuation, ``context + continuation`` is encoded whole, and the continuation's tokens are
what follows the context's own encoding, so merges across the boundary match what the model
would see when generating. Batches are left-padded with explicit position ids, and only the
logits of the last positions are materialised (``logits_to_keep`` where the model has it).

When every choice of a question is a single token after the context (`` A`` ... `` J`` for
usual tokenisers), one forward pass over the context scores all of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from hf_nvfp4.eval.tasks.base import LoglikResult, scored_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def split_tokens(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as encoded after it (the context's
    trailing whitespace goes with the continuation: see :func:`scored_text`)."""
    continuation = scored_text(context, continuation)
    context = context.rstrip()
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def _max_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _last_logprobs(model, sequences: Sequence[list[int]], keep: int, pad_id: int) -> torch.Tensor:
    """Float32 log-softmax of the last ``keep`` positions of each left-padded sequence."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=False,
        **kwargs,
    ).logits[:, -keep:]
    return torch.log_softmax(logits.float(), dim=-1)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


@torch.inference_mode()
def loglikelihood(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    desc: str = "loglik",
    progress: bool = True,
) -> list[LoglikResult]:
    """Summed log-probability of each ``(context, continuation)``'s continuation tokens.

    Sequences longer than the model's context lose their first tokens (the continuation is
    kept whole while it fits).
    """
    limit = _max_length(model)
    requests = []
    for context, continuation in pairs:
        ctx, cont = split_tokens(tokenizer, context, continuation)
        seq = (ctx + cont)[:-1]
        if limit is not None:
            seq = seq[-limit:]
        requests.append((seq, cont[-len(seq) :]))
    results: list[LoglikResult | None] = [None] * len(pairs)
    pad = _pad_id(tokenizer)
    with tqdm(total=len(pairs), desc=desc, disable=not progress) as bar:
        for batch in _batches([len(r[0]) for r in requests], batch_size):
            keep = max(len(requests[i][1]) for i in batch)
            logprobs = _last_logprobs(model, [requests[i][0] for i in batch], keep, pad)
            for row, i in enumerate(batch):
                cont = requests[i][1]
                lp = logprobs[row, keep - len(cont) :]
                target = torch.tensor(cont, device=lp.device)
                token_lp = lp.gather(-1, target[:, None])[:, 0]
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = LoglikResult(float(token_lp.sum()), len(cont), greedy)
            bar.update(len(batch))
    return results  # type: ignore[return-value]


def _single_tokens(tokenizer, context: str, choices: Sequence[str]) -> tuple[list, list] | None:
    """Context ids and one token id per choice, or None if some choice is longer."""
    ids = []
    ctx = None
    for choice in choices:
        ctx, cont = split_tokens(tokenizer, context, choice)
        if len(cont) != 1:
            return None
        ids.append(cont[0])
    return ctx, ids


@torch.inference_mode()
def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 8,
    desc: str = "choices",
    progress: bool = True,
) -> list[list[float]]:
    """Log-probability of every choice of every context (summed over the choice's tokens)."""
    limit = _max_length(model)
    out: list[list[float] | None] = [None] * len(contexts)
    fast, slow = [], []
    for i, (context, options) in enumerate(zip(contexts, choices, strict=True)):
        split = _single_tokens(tokenizer, context, options)
        if split is None:
            slow.append(i)
        else:
            ctx, ids = split
            fast.append((i, ctx[-limit:] if limit is not None else ctx, ids))
    pad = _pad_id(tokenizer)
    with tqdm(total=len(fast), desc=desc, disable=not progress or not fast) as bar:
        for batch in _batches([len(f[1]) for f in fast], batch_size):
            logprobs = _last_logprobs(model, [fast[j][1] for j in batch], 1, pad)
            for row, j in enumerate(batch):
                i, _, ids = fast[j]
                out[i] = [float(logprobs[row, 0, t]) for t in ids]
            bar.update(len(batch))
    pairs = [(contexts[i], c) for i in slow for c in choices[i]]
    scored = iter(loglikelihood(model, tokenizer, pairs, batch_size, desc, progress))
    for i in slow:
        out[i] = [next(scored).logprob for _ in choices[i]]
    return out  # type: ignore[return-value]
