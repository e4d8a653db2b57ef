"""``sparsekit bench model --task generate``: causal-LM decoding from the command line.

A tiny random Llama / GPT-2 from a config, a few tokens, one rep: the command runs end to end,
writes its JSON (baselines, per-setting runs with prefill and decode apart, the token check,
machine), and rejects arguments that do not apply with errors naming the option.
"""

from __future__ import annotations

import json
import os

import pytest

from sparsekit import cli
from sparsekit.bench import decode

pytest.importorskip("transformers")

TINY = ["--hidden", "64", "--ffn", "128", "--layers", "1", "--heads", "4", "--vocab", "96",
        "--prompt-tokens", "8", "--new-tokens", "4", "--reps", "1", "--calib-seqs", "2",
        "--calib-len", "16", "--threads", "1", "--no-bandwidth"]


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_llama_config_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "llm.json"
    argv = ["bench", "model", "--hf-config", "llama", *TINY, "--sparsities", "0.5,2:4",
            "--dtypes", "fp32,bf16", "--dense", "F.linear,torch.matmul,numpy",
            "--out", str(out_json)]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "LlamaForCausalLM from a llama config" in out
    assert "vs best dense" in out and "sparse 2:4" in out
    doc = json.loads(out_json.read_text())
    assert doc["complete"] is True
    assert {"machine", "date_utc", "versions", "argv", "config"} <= set(doc)
    assert doc["machine"]["cpu_model"] and doc["machine"]["num_threads"] == 1
    assert "transformers" in doc["versions"]
    base = doc["baselines"]
    assert set(base["formulations"]) == {"torch.matmul", "numpy"}
    for r in base["formulations"].values():
        assert r["tokens_equal_dense_fp32"] is True  # fp32 formulations, same greedy tokens
        assert r["prefill_s"] > 0 and r["decode_s_per_token"] > 0
    assert base["best_dense"]["formulation"] in ("F.linear", "torch.matmul", "numpy")
    assert base["dense_bf16"]["decode_speedup_vs_dense_fp32"] > 0
    runs = {(r["setting"], r["value_dtype"]): r for r in doc["runs"]}
    assert set(runs) == {("0.5", "fp32"), ("0.5", "bf16"), ("2:4", "fp32"), ("2:4", "bf16")}
    for r in runs.values():
        assert abs(r["pruned_sparsity"] - 0.5) < 0.02
        # the tiny model's logits are far from ties: greedy tokens must match exactly
        assert r["tokens_equal_masked_dense"] is True
        assert r["sparse"]["prefill_s"] > 0 and r["sparse"]["decode_s_per_token"] > 0
        ratio = r["dense_fp32_same_run"]["decode_s_per_token"] / r["sparse"][
            "decode_s_per_token"]
        assert r["decode_speedup_vs_dense_fp32"] == pytest.approx(ratio)
        assert "decode_speedup_vs_best_dense" in r and "decode_speedup_vs_dense_bf16" in r
        assert r["summary"]["Linear"]  # every projection reported
    assert doc["dense_fp32_tokens"] and len(doc["dense_fp32_tokens"]) == 4


def test_generate_gpt2_config_convert_all_quiet(tmp_path, capsys):
    out_json = tmp_path / "gpt2.json"
    argv = ["bench", "model", "--hf-config", "gpt2", *TINY, "--sparsities", "0.7",
            "--dtypes", "fp32", "--dense", "F.linear", "--no-bf16-dense", "--convert", "all",
            "--prune-in-place",
            "-q", "--out", str(out_json), "--lock", str(tmp_path / "bench.lock")]
    if _can_realtime():
        argv.append("--realtime")
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert out == ""
    doc = json.loads(out_json.read_text())
    (run,) = doc["runs"]
    assert run["tokens_equal_masked_dense"] is True
    # --convert all: every pruned Conv1D (and lm_head) is sparse
    assert run["summary"]["Conv1D"] == {"converted": 4}
    assert run["lm_head"]["status"] == "converted"
    assert "dense_bf16" not in doc["baselines"]
    assert doc["baselines"]["best_dense"]["formulation"] == "F.linear"
    if "--realtime" in argv:
        assert doc["machine"]["sched_policy_timed"].startswith("SCHED_FIFO")
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # restored after the timed sections


def _can_realtime() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, PermissionError, OSError):
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


def test_generate_from_local_directory(tmp_path, capsys):
    import torch
    import transformers

    torch.manual_seed(0)
    conf = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2,
                                    vocab_size=80, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(conf).save_pretrained(tmp_path / "m")
    argv = ["bench", "model", "--task", "generate", "--model", f"hf:{tmp_path / 'm'}",
            "--prompt-tokens", "6", "--new-tokens", "3", "--reps", "1", "--calib-seqs", "2",
            "--calib-len", "8", "--threads", "1", "--dense", "F.linear", "--dtypes", "fp32",
            "--sparsities", "0.6", "--no-bf16-dense", "--no-bandwidth"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "LlamaForCausalLM from m" in out and "sparse 0.6" in out


GEN = ["bench", "model", "--hf-config", "llama"]


@pytest.mark.parametrize("argv, needle", [
    (["bench", "model", "--task", "generate"], "--model"),
    (["bench", "model", "--task", "generate", "--model", "bert-base"], "--model"),
    (["bench", "model", "--task", "generate", "--model", "hf:/nonexistent/llm"],
     "no such directory"),
    (["bench", "model", "--model", "hf:x", "--hf-config", "llama"], "either"),
    (["bench", "model", "--task", "forward", "--hf-config", "llama"], "--hf-config"),
    (["bench", "model", "--hidden", "64"], "--hidden: only applies to --task generate"),
    (["bench", "model", "--sparsities", "2:4"], "N:M"),
    (["bench", "model", "--hf-config", "mamba"], "--hf-config"),
    ([*GEN, "--sparsities", "4:2"], "--sparsities"),
    ([*GEN, "--sparsities", "0"], "--sparsities"),
    ([*GEN, "--batches", "1,8"], "--batches: --task generate decodes at batch 1"),
    ([*GEN, "--formats", "csr"], "--formats"),
    ([*GEN, "--min-reps", "3"], "--min-reps"),
    ([*GEN, "--rotate-factor", "0"], "--rotate-factor"),
    ([*GEN, "--seq-len", "64"], "--seq-len"),
    ([*GEN, "--csv", "x.csv"], "--csv"),
    ([*GEN, "--devices", "cuda"], "--devices"),
    ([*GEN, "--dtypes", "fp16"], "--dtypes: expected fp32 or bf16"),
    ([*GEN, "--dense", "cublas"], "--dense"),
    ([*GEN, "--hidden", "100", "--heads", "3"], "--heads: expected a divisor"),
    ([*GEN, "--heads", "4", "--kv-heads", "3", "--hidden", "64"], "--kv-heads"),
    (["bench", "model", "--hf-config", "gpt2", "--kv-heads", "2"], "--kv-heads"),
    ([*GEN, "--new-tokens", "1"], "--new-tokens"),
    ([*GEN, "--reps", "0"], "--reps"),
    ([*GEN, "--sparsities", "0.5,0.7", "--prune-in-place"], "--prune-in-place: expected one"),
    ([*GEN, "--lock", "/nonexistent/dir/bench.lock"], "--lock"),
    (["bench", "model", "--lock", "x.lock"], "--lock: only applies to --task generate"),
])
def test_generate_bad_arguments(argv, needle, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main([*argv, "--no-bandwidth"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_hf_config_choices_match_library():
    assert cli.HF_CONFIG_CHOICES == decode.HF_CONFIGS


def test_parse_setting():
    assert decode.parse_setting("0.70") == ("0.7", {"sparsity": 0.7})
    assert decode.parse_setting(" 2:4 ") == ("2:4", {"granularity": "2:4"})
    for bad in ("1.0", "-0.1", "4:4", "x", "0:4"):
        with pytest.raises(ValueError, match="expected"):
            decode.parse_setting(bad)
