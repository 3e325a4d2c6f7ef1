"""End to end on two tiny random Llama models: evaluate, compare, CLI, and batching checks."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from hf_nvfp4.cli_eval import add_eval_commands, parse_models
from hf_nvfp4.eval import EvalOptions, compare, evaluate, load_model
from hf_nvfp4.eval.generation import GenerationConfig, StopOnStrings, generate, truncate_at_stop
from hf_nvfp4.eval.loglik import choice_logprobs, loglikelihood, split_tokens

TASKS = "mmlu_pro,gsm8k,humaneval,mmlu_pro_mc,loglik"


def _options(tiny_data, **kw) -> EvalOptions:
    base = dict(
        limit=3,
        max_new_tokens=4,
        num_fewshot=0,
        data_dir=str(tiny_data),
        use_hub=False,
        device="cpu",
        dtype="float32",
        progress=False,
        sandbox_timeout_s=5.0,
    )
    return EvalOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_model(tiny_models["base"], device="cpu", dtype="float32")


def test_evaluate_writes_per_item_json(tiny_models, tiny_data, tmp_path):
    results = evaluate(tiny_models["base"], TASKS, _options(tiny_data), output_dir=tmp_path)
    assert list(results) == [
        "mmlu_pro",
        "gsm8k",
        "humaneval",
        "mmlu_pro_mc",
        "mmlu_pro_loglik",
        "gsm8k_loglik",
        "humaneval_loglik",
    ]
    for name, result in results.items():
        on_disk = json.loads((tmp_path / f"{name}.json").read_text())
        assert on_disk["num_items"] == len(on_disk["items"]) == 3
        assert on_disk["metrics"] == result["metrics"]
        value = result["metrics"][result["metric"]]
        if name.endswith("_loglik"):
            # random model over ~259 tokens, one byte each: about -ln(259) = -5.56 nats/byte
            assert -8.0 < value < -4.0
            assert result["metrics"]["bits_per_byte"] == pytest.approx(-value / math.log(2))
        else:
            assert 0.0 <= value <= 1.0
    assert all(
        r["results"][0].startswith(("failed", "passed")) for r in results["humaneval"]["items"]
    )
    assert set(json.loads((tmp_path / "summary.json").read_text())) == set(results)


def test_compare_writes_table_json_and_plot(tiny_models, tiny_data, tmp_path):
    summary = compare(
        {"bf16": tiny_models["base"], "nvfp4": tiny_models["other"]},
        TASKS,
        options=_options(tiny_data),
        output_dir=tmp_path,
    )
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "nvfp4" / "gsm8k.json").is_file()
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| task | metric | bf16 | nvfp4 |" in markdown
    assert "## Paired differences against bf16" in markdown
    assert "excluded from scoring" in markdown  # the few-shot source is reported
    for task, entry in summary["tasks"].items():
        row = entry["vs_baseline"]["nvfp4"]
        assert row["n"] == 3
        assert row["diff"] == pytest.approx(entry["scores"]["nvfp4"] - entry["scores"]["bf16"])
        assert row["ci_low"] <= row["diff"] + 1e-12 and row["diff"] <= row["ci_high"] + 1e-12
        if task.endswith("_loglik"):
            assert row["mcnemar_p"] is None and row["diff"] != 0.0
        else:
            assert 0.0 <= row["mcnemar_p"] <= 1.0
        assert f"| {task} | nvfp4 | 3 |" in markdown
    assert json.loads((tmp_path / "comparison.json").read_text())["baseline"] == "bf16"


def test_cli_compare_and_reuse(tiny_models, tiny_data, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="hf-nvfp4")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    argv = [
        "compare",
        "--models",
        f"a={tiny_models['base']}",
        f"b={tiny_models['other']}",
        "--tasks",
        "gsm8k_loglik,humaneval",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--data-dir",
        str(tiny_data),
        "--offline",
        "--device",
        "cpu",
        "--no-progress",
        "--output-dir",
        str(tmp_path),
        "--baseline",
        "b",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    result = tmp_path / "a" / "humaneval.json"
    first, written = result.read_text(), result.stat().st_mtime_ns
    assert "| gsm8k_loglik | a | 2 |" in capsys.readouterr().out
    args = parser.parse_args([*argv, "--reuse"])
    assert args.func(args) == 0
    # reused, not recomputed: a recomputation would write the file again (same content but
    # its elapsed_s, which can round alike)
    assert result.read_text() == first and result.stat().st_mtime_ns == written


def test_parse_models_errors():
    assert parse_models(["x=/p", "y=/q=r"]) == {"x": "/p", "y": "/q=r"}
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
        parse_models(["nopath"])
    with pytest.raises(argparse.ArgumentTypeError, match="unique"):
        parse_models(["x=/p", "x=/q"])


def test_batched_greedy_generation_matches_one_by_one(loaded):
    model, tokenizer = loaded
    prompts = ["Question: 1+1?\nAnswer:", "Hi", "def f(x):\n    return"]
    config = GenerationConfig(max_new_tokens=6)
    batched = generate(model, tokenizer, prompts, (), config, batch_size=3, progress=False)
    single = generate(model, tokenizer, prompts, (), config, batch_size=1, progress=False)
    assert batched == single
    assert all(len(out) == 1 for out in batched)


def test_sampling_returns_n_samples(loaded):
    model, tokenizer = loaded
    config = GenerationConfig(max_new_tokens=4, num_samples=3, temperature=1.0)
    out = generate(model, tokenizer, ["a", "bb"], (), config, batch_size=2, progress=False)
    assert [len(o) for o in out] == [3, 3]
    with pytest.raises(ValueError, match="needs temperature"):
        generate(model, tokenizer, ["a"], (), GenerationConfig(num_samples=2), progress=False)


def test_stop_strings(loaded):
    _, tokenizer = loaded
    assert truncate_at_stop("4\n\nQuestion: next\n#", ("Question:", "\n#")) == "4\n\n"
    assert truncate_at_stop("    return 1\n#x\nQuestion:", ("Question:", "\n#")) == "    return 1"
    assert truncate_at_stop("no stop", ("Question:",)) == "no stop"
    stop = StopOnStrings(
        tokenizer, ["Question:"], len(tokenizer("Question: a\nAnswer:")["input_ids"])
    )
    for text, expected in [(" 4\n\nQuestion:", True), (" 4\n\nQuest", False), (" 4", False)]:
        ids = tokenizer("Question: a\nAnswer:" + text, return_tensors="pt")["input_ids"]
        assert stop(ids, None).tolist() == [expected]  # the prompt's "Question:" does not count


def test_loglik_matches_a_direct_forward_pass(loaded):
    model, tokenizer = loaded
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("x", "yz and more"), ("def f():\n", "  pass")]
    batched = loglikelihood(model, tokenizer, pairs, batch_size=3, progress=False)
    for (context, continuation), result in zip(pairs, batched, strict=True):
        ctx, cont = split_tokens(tokenizer, context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        expected = logprobs.gather(-1, targets[:, None])[-len(cont) :].sum()
        assert result.num_tokens == len(cont)  # byte tokens; trailing context space moves
        assert result.logprob == pytest.approx(float(expected), abs=1e-4)


def test_choice_fast_path_matches_general_path(loaded):
    model, tokenizer = loaded
    contexts = ["Question: pick\nAnswer:", "Another question\nAnswer:"]
    single = choice_logprobs(
        model, tokenizer, contexts, [[" A", " B"], [" A", " B", " C"]], progress=False
    )
    pairs = [
        (c, ch)
        for c, chs in zip(contexts, [[" A", " B"], [" A", " B", " C"]], strict=True)
        for ch in chs
    ]
    general = [r.logprob for r in loglikelihood(model, tokenizer, pairs, progress=False)]
    assert [x for row in single for x in row] == pytest.approx(general, abs=1e-4)


def _sentencepiece_style_tokenizer(texts):
    """A WordLevel tokenizer with Llama-2's decoder chain (its Strip drops one leading
    space of whatever is decoded on its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")


def test_completions_keep_their_leading_space_with_sentencepiece_decoders():
    from hf_nvfp4.eval.generation import _completions

    prompt, body = "def f ( x ) :", " return x + 1"
    tok = _sentencepiece_style_tokenizer([prompt + body])
    ctx = tok(prompt)["input_ids"]
    full = tok(prompt + body)["input_ids"]
    assert full[: len(ctx)] == ctx
    out = torch.tensor([full])
    assert tok.decode(full[len(ctx):]) == body.lstrip()  # decoded alone: the space is lost
    assert _completions(tok, out, len(ctx)) == [body]


def test_long_prompts_keep_half_the_context_and_generation_is_cut(loaded, caplog):
    model, tokenizer = loaded  # max_position_embeddings 512, byte tokens
    prompt = "x" * 2000
    config = GenerationConfig(max_new_tokens=1000)
    with caplog.at_level("WARNING", logger="hf_nvfp4.eval.generation"):
        out = generate(model, tokenizer, [prompt], (), config, progress=False)
    assert "keep their last 256" in caplog.text  # not 1 token: at least half the context
    assert "fewer than max_new_tokens=1000" in caplog.text
    assert len(out[0]) == 1


def test_per_byte_score_counts_the_bytes_it_scores():
    from hf_nvfp4.eval.tasks.base import LoglikResult, scored_text
    from hf_nvfp4.eval.tasks.humaneval import HumanEvalLoglik

    # HumanEval prompts end in a newline, which the tokenizer scores with the solution.
    item = {"id": "t/0", "context": "def f():\n", "continuation": "    return 1\n"}
    assert scored_text(item["context"], item["continuation"]) == "\n    return 1\n"
    records = HumanEvalLoglik().score([item], [LoglikResult(-14.0, 5, False)])
    assert records[0]["num_bytes"] == 14 and records[0]["value"] == -1.0


def test_cli_eval_without_data_is_one_line_naming_the_flags(tiny_models, tmp_path, capsys):
    from hf_nvfp4.cli import main

    argv = ["eval", "--model", str(tiny_models["base"]), "--tasks", "gsm8k", "--offline",
            "--limit", "1", "--device", "cpu", "--output-dir", str(tmp_path / "out"),
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the weight-loading bar
    assert line.startswith("hf-nvfp4: error: no data for gsm8k")
    assert "--data-dir" in line and "--offline" in line
    assert main(["eval", "--model", str(tmp_path / "missing"), "--tasks", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("hf-nvfp4: error:") and "Traceback" not in err


def test_evaluate_an_nvfp4_model(tiny_models, tiny_data):
    """The suite scores a model whose blocks run NVFP4 (under torch.inference_mode, whose
    tensors have no version counter: the shared input quantization must not need one)."""
    from hf_nvfp4 import NVFP4Config, convert

    model, tok = load_model(tiny_models["base"], device="cpu", dtype="float32")
    want = evaluate(model, "loglik,mmlu_pro_mc", _options(tiny_data), tokenizer=tok)
    summary = convert(model, NVFP4Config(backend="reference", first_bf16_blocks=0,
                                         last_bf16_blocks=0), verbose=False)
    assert len(summary.quantized_layers) == 14
    got = evaluate(model, "loglik,mmlu_pro_mc", _options(tiny_data), tokenizer=tok)
    for name, result in got.items():
        value, base = result["metrics"][result["metric"]], want[name]["metrics"][result["metric"]]
        assert math.isfinite(value)
        if name.endswith("_loglik"):  # 4-bit weights and activations move every score a little
            assert value != base and abs(value - base) < 0.5
