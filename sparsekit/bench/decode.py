"""Causal-LM decoding end to end: a Wanda-pruned, sparsified ``transformers`` model vs dense.

The logic behind ``sparsekit bench model --task generate``, ``benchmarks/bench_llm.py`` and
``examples/llm_decode.py``. For each setting (a sparsity such as ``0.7`` or an ``N:M`` pattern
such as ``2:4``) the dense model is pruned with Wanda (calibration: token windows of the Python
documentation in ``pydoc_data.topics``), kept as the *masked dense* model, copied and converted
with :func:`sparsekit.sparsify` tuned for batch 1 (``lm_head`` included when it pays; optionally
bfloat16 values), and run through greedy ``generate()`` from the same prompt. Per model:
prefill time (prompt -> first new token) and decode time per token (the remaining tokens),
timed apart, and whether the generated tokens equal the masked dense model's (for bf16 values:
the masked dense model with bf16-rounded weights computed in fp32, which is what the sparse
kernels compute).

Baselines, all timed in the same run and round-robin (one ``generate`` of each model per round,
so load from other processes hits them alike):

* the dense fp32 model as torch runs it (``F.linear`` in every ``nn.Linear``);
* the *best dense layer* model: the same model with every ``nn.Linear`` computed by each dense
  formulation of :func:`sparsekit.bench.baselines.dense_contenders` (``torch.matmul`` on a
  pre-transposed weight, oneDNN / MKL packed weights, numpy/OpenBLAS), the fastest decode wins;
* the dense model in bfloat16 (``model.to(torch.bfloat16)``).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import gc
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HF_CONFIGS", "DecodeBench", "build_causal_lm", "encode", "calibration_text",
           "calibration_batches", "make_prompt", "run_generate", "time_round_robin",
           "weight_bytes", "round_weights_", "parse_setting", "run_decode_bench",
           "write_results"]

#: ``--hf-config`` families: the ``transformers`` class and its config's field names
HF_CONFIGS = ("llama", "gpt2")
#: dense formulations tried for the best-dense-layer baseline (names of dense_contenders)
DECODE_DENSE = ("F.linear", "torch.matmul", "onednn", "mkl_packed", "numpy")
_VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``"0.7"`` -> ``("0.7", {"sparsity": 0.7})``; ``"2:4"`` -> ``("2:4", {"granularity":
    "2:4"})``. Raises ValueError for anything else."""
    m = _NM.match(str(text))
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"expected N:M with 0 < N < M, got {text!r}")
        return f"{n}:{mm}", {"granularity": f"{n}:{mm}"}
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected a sparsity in (0, 1) or an N:M pattern such as 2:4, "
                         f"got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"expected a sparsity in (0, 1) or an N:M pattern such as 2:4, "
                         f"got {text!r}")
    return f"{v:g}", {"sparsity": v}


@dataclass
class DecodeBench:
    """What a decode benchmark measures (see the module docstring).

    Exactly one of ``model`` (a local ``transformers`` causal-LM directory) and ``hf_config``
    (a family of :data:`HF_CONFIGS`, built from a config with random weights) is given.
    """

    model: str | None = None
    hf_config: str | None = None
    hidden: int = 4096
    ffn: int | None = None  # default: the family's usual ratio (llama 8/3 rounded, gpt2 4x)
    layers: int = 2
    heads: int | None = None  # default: hidden // 128 (at least 1)
    kv_heads: int | None = None  # default: heads
    vocab: int = 2048
    settings: Sequence[str] = ("0.7",)
    value_dtypes: Sequence[str] = ("fp32", "bf16")
    prompt_tokens: int = 32
    new_tokens: int = 24
    reps: int = 3
    calib_seqs: int = 8
    calib_len: int = 128
    threads: int | None = None
    seed: int = 0
    dense_bf16: bool = True
    dense: Sequence[str] = DECODE_DENSE
    convert: str = "tuned"
    backend: str = "auto"
    #: a file to hold an exclusive ``flock`` on while timing (and tuning ``sparsify``), so
    #: timed runs of several processes on a shared machine never overlap; building, pruning
    #: and copying models run outside it
    lock: str | None = None
    #: run the timed sections (and sparsify's tuning) with SCHED_FIFO priority 1 on every
    #: thread of the process: on a shared machine, other sessions' jobs otherwise delay the
    #: OpenMP hand-offs of every operator by scheduler ticks (Linux, needs CAP_SYS_NICE)
    realtime: bool = False
    #: prune the dense model itself (one setting only) and time it, masked, as the dense fp32
    #: model (a dense product costs the same with zeros in the weight): one model copy less,
    #: for models near the machine's memory
    prune_in_place: bool = False
    prompt: str = "Greedy decoding with a sparse model: the print() function writes"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, what was expected and what was got."""
        if (self.model is None) == (self.hf_config is None):
            raise ValueError(f"model / hf_config: expected exactly one (a local transformers "
                             f"directory or a config family from {HF_CONFIGS}), got model="
                             f"{self.model!r}, hf_config={self.hf_config!r}")
        if self.model is not None and not Path(self.model).is_dir():
            raise ValueError(f"model: expected a local transformers model directory (weights "
                             f"are not downloaded here), got {self.model!r} (no such directory)")
        if self.hf_config is not None and self.hf_config not in HF_CONFIGS:
            raise ValueError(f"hf_config: expected one of {HF_CONFIGS}, got {self.hf_config!r}")
        for name in ("hidden", "layers", "vocab", "prompt_tokens", "new_tokens", "reps",
                     "calib_seqs", "calib_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens: expected >= 2 (prefill gives the first token, decode "
                             f"is timed on the rest), got {self.new_tokens}")
        for name in ("ffn", "heads", "kv_heads", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {v!r}")
        heads = self.n_heads
        if self.hf_config is not None and self.hidden % heads:
            raise ValueError(f"heads: expected a divisor of hidden={self.hidden}, got {heads}")
        if self.kv_heads is not None and heads % self.kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads={heads}, got "
                             f"{self.kv_heads}")
        if not self.settings:
            raise ValueError("settings: expected at least one sparsity or N:M pattern, got none")
        for s in self.settings:
            try:
                parse_setting(s)
            except ValueError as e:
                raise ValueError(f"settings: {e}") from None
        if not self.value_dtypes:
            raise ValueError("value_dtypes: expected fp32 and/or bf16, got none")
        for v in self.value_dtypes:
            if v not in _VALUE_DTYPES:
                raise ValueError(f"value_dtypes: expected fp32 or bf16, got {v!r}")
        bad = [d for d in self.dense if d not in DECODE_DENSE]
        if bad:
            raise ValueError(f"dense: expected names from {DECODE_DENSE}, got {bad}")
        if self.prune_in_place and len(self.settings) != 1:
            raise ValueError(f"prune_in_place: expected one setting (the dense model is pruned "
                             f"once), got settings={list(self.settings)}")
        if self.convert not in ("tuned", "all"):
            raise ValueError(f"convert: expected 'tuned' or 'all', got {self.convert!r}")

    @property
    def n_heads(self) -> int:
        return self.heads if self.heads is not None else max(1, self.hidden // 128)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly configuration."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


# --------------------------------------------------------------------------------------------
# Model, text, prompt
# --------------------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError:
        raise RuntimeError("causal-LM decoding needs the 'transformers' package, which is not "
                           "installed (pip install transformers)") from None
    return transformers


def build_causal_lm(cfg: DecodeBench) -> tuple[nn.Module, Any, str]:
    """``(model in eval mode, tokenizer or None, description)`` for ``cfg``.

    A local directory is loaded with ``AutoModelForCausalLM`` in fp32 (its tokenizer too, when
    it has one); a config family is built with random weights (``torch.manual_seed(seed)``),
    ``lm_head`` untied from the embedding so it can be pruned and converted on its own.
    """
    tf = _transformers()
    if cfg.model is not None:
        model = tf.AutoModelForCausalLM.from_pretrained(cfg.model, torch_dtype=torch.float32)
        try:
            tok = tf.AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError, TypeError):
            tok = None
        return model.eval(), tok, f"{type(model).__name__} from {Path(cfg.model).name}"
    torch.manual_seed(cfg.seed)
    heads = cfg.n_heads
    if cfg.hf_config == "llama":
        ffn = cfg.ffn or 256 * -(-(8 * cfg.hidden // 3) // 256)
        conf = tf.LlamaConfig(hidden_size=cfg.hidden, intermediate_size=ffn,
                              num_hidden_layers=cfg.layers, num_attention_heads=heads,
                              num_key_value_heads=cfg.kv_heads or heads, vocab_size=cfg.vocab,
                              max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                              tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(conf)
    else:  # gpt2
        ffn = cfg.ffn or 4 * cfg.hidden
        conf = tf.GPT2Config(n_embd=cfg.hidden, n_inner=ffn, n_layer=cfg.layers, n_head=heads,
                             vocab_size=cfg.vocab, n_positions=1024, bos_token_id=1,
                             eos_token_id=2, tie_word_embeddings=False)
        model = tf.GPT2LMHeadModel(conf)
    desc = (f"{type(model).__name__} from a {cfg.hf_config} config: {cfg.layers} layers, hidden "
            f"{cfg.hidden}, FFN {ffn}, {heads} heads"
            + (f" ({cfg.kv_heads} KV heads)" if cfg.kv_heads and cfg.kv_heads != heads else "")
            + f", vocab {cfg.vocab}, random weights (std {conf.initializer_range})")
    return model.eval(), None, desc


def encode(text: str, tok: Any, vocab: int) -> torch.Tensor:
    """Token ids of ``text``: the tokenizer's, or without one the UTF-8 bytes modulo ``vocab``."""
    if tok is not None:
        return torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % vocab


def calibration_text() -> str:
    """The Python documentation topics shipped with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def calibration_batches(ids: torch.Tensor, seqs: int, length: int, batch: int = 2
                        ) -> list[torch.Tensor]:
    """``seqs`` consecutive windows of ``length`` tokens, in batches of ``batch`` sequences."""
    if ids.numel() < seqs * length:
        raise ValueError(f"calibration: expected at least {seqs * length} tokens "
                         f"(calib_seqs x calib_len), got {ids.numel()}")
    windows = ids[: seqs * length].reshape(seqs, length)
    return [windows[i:i + batch] for i in range(0, seqs, batch)]


def make_prompt(prefix: str, ids: torch.Tensor, tok: Any, vocab: int, n: int) -> torch.Tensor:
    """A prompt of ``n`` tokens: ``prefix`` after the last tokens of ``ids``."""
    return torch.cat([ids[-n:], encode(prefix, tok, vocab)])[-n:]


class _Clock:
    """A ``generate`` streamer that timestamps every emitted chunk (the first: the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int
                 ) -> tuple[list[int], float, float]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens at batch 1: ``(generated ids, prefill
    seconds, decode seconds per token)``; prefill ends when the first new token is out."""
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None],
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, streamer=clock, pad_token_id=0)
    ts = clock.times[1:]
    prefill = ts[0] - t0
    decode = (ts[-1] - ts[0]) / max(1, len(ts) - 1)
    return out[0, prompt.numel():].tolist(), prefill, decode


def time_round_robin(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int,
                     reps: int) -> dict[str, dict[str, Any]]:
    """Generate with every model ``reps`` times, one run of each per round; medians per model.

    Returns name -> ``tokens``, ``prefill_s``, ``decode_s_per_token``, ``decode_tokens_per_s``
    and the individual runs.
    """
    for m in models.values():
        run_generate(m, prompt, 2)  # warm-up: allocations, backend caches, thread pools
    runs: dict[str, list[tuple[list[int], float, float]]] = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            runs[k].append(run_generate(m, prompt, new_tokens))
    out = {}
    for k, rs in runs.items():
        decode = statistics.median(r[2] for r in rs)
        out[k] = {"tokens": rs[0][0], "prefill_s": statistics.median(r[1] for r in rs),
                  "decode_s_per_token": decode, "decode_tokens_per_s": 1.0 / decode,
                  "all_decode_s_per_token": [r[2] for r in rs],
                  "all_prefill_s": [r[1] for r in rs]}
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the projection weights: dense Linear / Conv1D weights and SparseLinear storage."""
    from sparsekit._layers import is_hf_conv1d
    from sparsekit.nn import SparseLinear

    total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            total += m.nbytes
        elif isinstance(m, nn.Linear) or is_hf_conv1d(m):
            total += m.weight.numel() * m.weight.element_size()
    return total


def round_weights_(model: nn.Module, dtype: torch.dtype, names: Sequence[str] | None = None
                   ) -> None:
    """Round projection weights to ``dtype`` and back, in place: the masked dense twin of a
    sparse model whose values are stored in ``dtype``. ``names``: only these modules (the ones
    ``sparsify`` converted; layers it kept dense compute with their own weights); default all.
    """
    from sparsekit._layers import is_hf_conv1d

    want = None if names is None else set(names)
    with torch.no_grad():
        for name, m in model.named_modules():
            if (isinstance(m, nn.Linear) or is_hf_conv1d(m)) and (want is None or name in want):
                m.weight.copy_(m.weight.to(dtype).float())


def formulate(model: nn.Module, name: str) -> nn.Module:
    """Copy of ``model`` whose every ``nn.Linear`` runs the dense formulation ``name``
    (prepared for batch 1, the decode shape)."""
    from sparsekit.bench.model import _formulate

    return _formulate(model, name, 1)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: str | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` inside the block (nothing when None)."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sched_policy() -> str:
    """This process's CPU scheduling policy (``SCHED_FIFO`` when run under ``chrt -f``)."""
    try:
        pol = os.sched_getscheduler(0)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return "unknown"
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR",
                                         "SCHED_BATCH", "SCHED_IDLE") if hasattr(os, n)}
    name = names.get(pol, str(pol))
    if name in ("SCHED_FIFO", "SCHED_RR"):
        name += f" priority {os.sched_getparam(0).sched_priority}"
    return name


def _set_fifo(policy: int, priority: int) -> None:
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(priority))
        except ProcessLookupError:  # the thread ended meanwhile
            pass


@contextlib.contextmanager
def _exclusive(lock: str | None, realtime: bool) -> Iterator[None]:
    """The lock (if any), and SCHED_FIFO 1 on every thread inside the block when ``realtime``
    (threads started inside inherit it; all go back to SCHED_OTHER after)."""
    with _locked(lock):
        if not realtime:
            yield
            return
        try:
            _set_fifo(os.SCHED_FIFO, 1)
        except PermissionError as e:
            _set_fifo(os.SCHED_OTHER, 0)
            raise RuntimeError(f"realtime: SCHED_FIFO needs CAP_SYS_NICE (root), got {e}") from e
        try:
            yield
        finally:
            _set_fifo(os.SCHED_OTHER, 0)


def _release() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so the next multi-GB model
    copy does not stack on freed-but-kept memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_gb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:  # pragma: no cover - not Linux
        pass
    return float("nan")


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "tokens"}


def run_decode_bench(cfg: DecodeBench, *, log: Callable[[str], None] = print,
                     on_update: Callable[[dict[str, Any]], None] | None = None
                     ) -> dict[str, Any]:
    """Run the decode benchmark of ``cfg``; returns the results (JSON-able).

    ``log`` receives one line per measured model; ``on_update(results)`` is called after the
    baseline phase and after every sparse run (e.g. to write partial results).

    Raises
    ------
    ValueError
        A bad configuration (the message names the field).
    RuntimeError
        ``transformers`` is not installed.
    """
    from sparsekit.bench.thread_control import threads_for_all
    from sparsekit.nn import sparsify
    from sparsekit.prune import prune

    cfg.validate()
    with threads_for_all(cfg.threads) as nthreads:
        model, tok, desc = build_causal_lm(cfg)
        vocab = int(model.config.vocab_size)
        ids = encode(calibration_text(), tok, vocab)
        calibration = calibration_batches(ids, cfg.calib_seqs, cfg.calib_len)
        prompt = make_prompt(cfg.prompt, ids, tok, vocab, cfg.prompt_tokens)
        log(desc)
        res: dict[str, Any] = {
            "model": desc, "config": cfg.to_dict(), "threads": nthreads,
            "prompt_tokens": int(prompt.numel()), "new_tokens": cfg.new_tokens,
            "reps": cfg.reps,
            "method": "greedy generate() at batch 1; prefill = prompt -> first new token, decode "
                      "= per token after it; medians of reps; every sparse model timed "
                      "round-robin with the dense fp32 model and the best dense-layer model "
                      "(same run, same load); the dense baselines (every formulation, bf16) "
                      "timed round-robin with dense fp32 in the baseline phase",
            "baselines": {}, "runs": []}
        pre = None
        if cfg.prune_in_place:  # before anything else holds a copy of the model
            t0 = time.perf_counter()
            prep0 = prune(model, criterion="wanda", calibration=calibration,
                          **parse_setting(cfg.settings[0])[1])
            pre = (prep0, time.perf_counter() - t0)
            _release()
            log(f"pruned in place in {pre[1]:.0f} s (resident memory {_rss_gb():.1f} GB); the "
                f"dense baselines below run the masked weights")
            res["method"] += ("; prune_in_place: the dense fp32 model and its formulations run "
                              "the masked dense weights (same cost as unpruned)")
        best_name = _baselines(cfg, model, prompt, res, log)
        _release()
        best_model = formulate(model, best_name) if best_name != "F.linear" else None
        log(f"(resident memory {_rss_gb():.1f} GB)")
        dense_tokens = res["baselines"]["dense_fp32"].pop("tokens")
        if on_update is not None:  # an interrupted run keeps its baselines
            on_update(res)
        for setting in cfg.settings:
            label, kw = parse_setting(setting)
            if pre is not None:
                masked, (prep, prune_s) = model, pre
            else:
                masked = copy.deepcopy(model)
                t0 = time.perf_counter()
                prep = prune(masked, criterion="wanda", calibration=calibration, **kw)
                prune_s = time.perf_counter() - t0
                _release()
                log(f"pruned to {label} in {prune_s:.0f} s (resident memory {_rss_gb():.1f} GB)")
            # fp32 first: the bf16 reference then rounds the masked weights in place
            order = sorted(cfg.value_dtypes, key=lambda v: v != "fp32")
            last = order[-1]
            for vname in order:
                vdt = _VALUE_DTYPES[vname]
                sp = copy.deepcopy(masked)
                with _exclusive(cfg.lock, cfg.realtime):  # sparsify's tuning is a measurement too
                    t0 = time.perf_counter()
                    srep = sparsify(sp, batch_sizes=(1,), value_dtype=vdt, min_sparsity=0.3,
                                    cache=False, backend=cfg.backend,
                                    margin=-1e9 if cfg.convert == "all" else 0.05)
                    sparsify_s = time.perf_counter() - t0
                if vdt != torch.float32:  # what the kernels compute: rounded values, fp32 math
                    round_weights_(masked, vdt, srep.replaced)
                ref = run_generate(masked, prompt, cfg.new_tokens)[0]
                if vname == last:  # not needed any more: free it before timing
                    del masked
                    _release()
                models = {"dense_fp32": model, "sparse": sp}
                if best_model is not None:
                    models["best_dense"] = best_model
                with _exclusive(cfg.lock, cfg.realtime):
                    t = time_round_robin(models, prompt, cfg.new_tokens, cfg.reps)
                res["runs"].append(_run_record(label, vname, prep, prune_s, srep, sparsify_s,
                                               sp, ref, t, res["baselines"], best_name))
                _log_run(log, res["runs"][-1])
                del sp, t
                _release()
                log(f"(resident memory {_rss_gb():.1f} GB)")
                if on_update is not None:
                    on_update(res)
        res["dense_fp32_tokens"] = dense_tokens
    return res


def _baselines(cfg: DecodeBench, model: nn.Module, prompt: torch.Tensor, res: dict[str, Any],
               log: Callable[[str], None]) -> str:
    """Time every dense formulation and the bf16 model, each round-robin with dense fp32; fill
    ``res['baselines']``; return the name of the fastest formulation."""
    base: dict[str, Any] = {"formulations": {}, "skipped": {}}
    fp32_runs: list[dict[str, Any]] = []
    ratios: dict[str, float] = {"F.linear": 1.0}
    for name in [d for d in cfg.dense if d != "F.linear"]:
        try:
            fm = formulate(model, name)
        except Exception as e:  # noqa: BLE001 - unsupported here: record why, go on
            base["skipped"][name] = f"{type(e).__name__}: {e}"
            continue
        with _exclusive(cfg.lock, cfg.realtime):
            t = time_round_robin({"dense_fp32": model, name: fm}, prompt, cfg.new_tokens,
                                 cfg.reps)
        del fm
        _release()
        r = t[name]
        r["tokens_equal_dense_fp32"] = r.pop("tokens") == t["dense_fp32"]["tokens"]
        ratios[name] = t["dense_fp32"]["decode_s_per_token"] / r["decode_s_per_token"]
        r["decode_speedup_vs_dense_fp32"] = ratios[name]
        r["dense_fp32_same_run"] = _strip(t["dense_fp32"])
        base["formulations"][name] = r
        fp32_runs.append(t["dense_fp32"])
        log(f"dense {name}: decode {r['decode_tokens_per_s']:.2f} tok/s (F.linear "
            f"{t['dense_fp32']['decode_tokens_per_s']:.2f}) = {ratios[name]:.2f}x")
    if cfg.dense_bf16:
        mb = copy.deepcopy(model).to(torch.bfloat16)
        with _exclusive(cfg.lock, cfg.realtime):
            t = time_round_robin({"dense_fp32": model, "dense_bf16": mb}, prompt,
                                 cfg.new_tokens, cfg.reps)
        del mb
        _release()
        r = t["dense_bf16"]
        r["tokens_equal_dense_fp32"] = r.pop("tokens") == t["dense_fp32"]["tokens"]
        r["decode_speedup_vs_dense_fp32"] = (t["dense_fp32"]["decode_s_per_token"]
                                             / r["decode_s_per_token"])
        r["weight_bytes"] = weight_bytes(model) // 2
        base["dense_bf16"] = r
        fp32_runs.append(t["dense_fp32"])
        log(f"dense bf16: decode {r['decode_tokens_per_s']:.2f} tok/s = "
            f"{r['decode_speedup_vs_dense_fp32']:.2f}x dense fp32")
    if not fp32_runs:  # nothing else to compare: time dense fp32 alone
        with _exclusive(cfg.lock, cfg.realtime):
            fp32_runs.append(time_round_robin({"dense_fp32": model}, prompt, cfg.new_tokens,
                                              cfg.reps)["dense_fp32"])
    dense = dict(fp32_runs[0])
    dense["decode_s_per_token"] = statistics.median(r["decode_s_per_token"] for r in fp32_runs)
    dense["decode_tokens_per_s"] = 1.0 / dense["decode_s_per_token"]
    dense["prefill_s"] = statistics.median(r["prefill_s"] for r in fp32_runs)
    dense["weight_bytes"] = weight_bytes(model)
    dense["note"] = "medians over the baseline-phase pairings"
    base["dense_fp32"] = dense
    best = max(ratios, key=lambda k: ratios[k])
    base["best_dense"] = {"formulation": best, "decode_speedup_vs_dense_fp32": ratios[best]}
    res["baselines"] = base
    log(f"best dense layer formulation: {best} ({ratios[best]:.2f}x dense fp32)")
    return best


def _run_record(label: str, vname: str, prep: Any, prune_s: float, srep: Any,
                sparsify_s: float, sp: nn.Module, ref: list[int], t: dict[str, Any],
                baselines: dict[str, Any], best_name: str) -> dict[str, Any]:
    r, d = t["sparse"], t["dense_fp32"]
    b = t.get("best_dense", d)
    first_diff = next((i for i, (a, c) in enumerate(zip(r["tokens"], ref)) if a != c), len(ref))
    try:
        lm: dict[str, Any] | None = srep["lm_head"].to_dict()
    except KeyError:  # a model without an lm_head module
        lm = None
    run = {
        "setting": label, "value_dtype": vname, "pruned_sparsity": prep.sparsity,
        "prune_s": prune_s, "sparsify_s": sparsify_s, "converted": srep.replaced,
        "summary": srep.summary(), "lm_head": lm, "weight_bytes": weight_bytes(sp),
        "tokens_equal_masked_dense": r["tokens"] == ref, "matching_prefix": first_diff,
        "sparse": _strip(r), "dense_fp32_same_run": _strip(d),
        "best_dense_formulation": best_name,
        "decode_speedup_vs_dense_fp32": d["decode_s_per_token"] / r["decode_s_per_token"],
        "decode_speedup_vs_best_dense": b["decode_s_per_token"] / r["decode_s_per_token"],
        "prefill_speedup_vs_dense_fp32": d["prefill_s"] / r["prefill_s"],
    }
    if "best_dense" in t:
        run["best_dense_same_run"] = _strip(b)
    bf16 = baselines.get("dense_bf16")
    if bf16:  # through the bf16 model's ratio to dense fp32 from the baseline phase
        run["decode_speedup_vs_dense_bf16"] = (run["decode_speedup_vs_dense_fp32"]
                                               / bf16["decode_speedup_vs_dense_fp32"])
    return run


def _log_run(log: Callable[[str], None], run: dict[str, Any]) -> None:
    r, d = run["sparse"], run["dense_fp32_same_run"]
    lm = run["lm_head"]
    log(f"{run['setting']:>4} {run['value_dtype']}: sparsity {run['pruned_sparsity']:.3f}, "
        f"{len(run['converted'])} layers sparse"
        + (f" (lm_head {lm['choice']})" if lm else "")
        + f", prefill {r['prefill_s'] * 1e3:.1f} ms (dense {d['prefill_s'] * 1e3:.1f}), decode "
        f"{r['decode_tokens_per_s']:.2f} tok/s (dense {d['decode_tokens_per_s']:.2f}) = "
        f"{run['decode_speedup_vs_dense_fp32']:.2f}x dense fp32, "
        f"{run['decode_speedup_vs_best_dense']:.2f}x best dense "
        f"({run['best_dense_formulation']})"
        + (f", {run['decode_speedup_vs_dense_bf16']:.2f}x dense bf16"
           if "decode_speedup_vs_dense_bf16" in run else "")
        + f"; tokens equal masked dense: {run['tokens_equal_masked_dense']}")


def summary_table(res: dict[str, Any], *, markdown: bool = False) -> str:
    """One row per model: decode tok/s, prefill, speedups, tokens equal to masked dense."""
    from sparsekit.bench.report import render_table

    head = ["model", "values", "weights MB", "prefill ms", "decode tok/s", "vs dense fp32",
            "vs best dense", "vs dense bf16", "tokens = masked"]
    b = res["baselines"]
    d = b["dense_fp32"]
    rows = [["dense (F.linear)", "fp32", f"{d['weight_bytes'] / 1e6:.0f}",
             f"{d['prefill_s'] * 1e3:.1f}", f"{d['decode_tokens_per_s']:.2f}", "1.00x", "", "",
             ""]]
    for name, r in b["formulations"].items():
        rows.append([f"dense ({name})", "fp32", "", f"{r['prefill_s'] * 1e3:.1f}",
                     f"{r['decode_tokens_per_s']:.2f}",
                     f"{r['decode_speedup_vs_dense_fp32']:.2f}x", "", "", ""])
    if "dense_bf16" in b:
        r = b["dense_bf16"]
        rows.append(["dense", "bf16", f"{r['weight_bytes'] / 1e6:.0f}",
                     f"{r['prefill_s'] * 1e3:.1f}", f"{r['decode_tokens_per_s']:.2f}",
                     f"{r['decode_speedup_vs_dense_fp32']:.2f}x", "", "1.00x", ""])
    for run in res["runs"]:
        r = run["sparse"]
        rows.append([f"sparse {run['setting']}", run["value_dtype"],
                     f"{run['weight_bytes'] / 1e6:.0f}", f"{r['prefill_s'] * 1e3:.1f}",
                     f"{r['decode_tokens_per_s']:.2f}",
                     f"{run['decode_speedup_vs_dense_fp32']:.2f}x",
                     f"{run['decode_speedup_vs_best_dense']:.2f}x",
                     (f"{run['decode_speedup_vs_dense_bf16']:.2f}x"
                      if "decode_speedup_vs_dense_bf16" in run else ""),
                     "yes" if run["tokens_equal_masked_dense"] else
                     f"NO (first {run['matching_prefix']} equal)"])
    return render_table(rows, head, markdown=markdown)


def write_results(res: dict[str, Any], path: str | os.PathLike[str], *, complete: bool,
                  argv: Sequence[str] | None = None) -> None:
    """Write ``res`` with machine (CPU model, ISA, versions, load average), date and
    ``complete`` (False for the partial file written after every run)."""
    from sparsekit.bench.machine import machine_info

    doc = copy.deepcopy(res)
    doc["complete"] = complete
    if argv is not None:
        doc["argv"] = list(argv)
    doc["machine"] = machine_info(res.get("threads") or torch.get_num_threads(),
                                  bandwidth=False)
    doc["machine"]["loadavg_1_5_15"] = list(os.getloadavg())
    doc["machine"]["sched_policy"] = sched_policy()
    if res.get("config", {}).get("realtime"):
        doc["machine"]["sched_policy_timed"] = "SCHED_FIFO priority 1 (realtime=True)"
    doc["date_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    versions = {"torch": torch.__version__}
    try:
        import sparsekit

        versions["sparsekit"] = sparsekit.__version__
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    doc["versions"] = versions
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")

