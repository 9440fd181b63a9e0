"""The generation engine against its baselines, in one run on one machine: JSON plus a table.

1. **Batch-1 decode** on the default model (SmolLM2-135M-Instruct), one prompt, ``--tokens`` new tokens: the
   engine with each CPU weight format, transformers ``generate`` (float32: the path every verb took before the
   engine), and llama.cpp (``llama-cpp-python``) on the very Q4_1 GGUF the default model comes from, when it is
   installed (``--llama-cpp-python PATH`` runs it with another interpreter, e.g. a venv that has it). Decode
   tokens/s excludes the prompt: (time(n tokens) - time(1 token)) / (n - 1). Each engine runs in a subprocess.
2. **Mixed-adapter step**: one decode step of ``--rows`` rows spread over 4 LoRA adapters: the engine's stacked,
   masked LoRA against grouping rows by adapter (an ``index_add_`` per group) and gathering each row's factors for
   a batched ``bmm``; and the same rows under one adapter, and on the bare base (the adapters' cost).
3. **Stack evaluation** (``--eval``): ``slmstack eval --stack default --subset tiny`` on arc_easy and hellaswag,
   on the engine and on transformers (``--engine hf``), wall time and accuracies.

    python benchmarks/engine.py --tokens 128 [--llama-cpp-python /path/to/venv/bin/python] [--eval]
    python benchmarks/engine.py --eval-only --out benchmarks/results/engine_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# a format, or format+compile: decode steps through torch.compile (Engine(graphs="compile"), `engine: compiled`);
# auto: what `run` and `serve` use by default (int4 on the GGUF's 4-bit blocks on a CPU); @torch: torch's int4
# kernel in place of slmstack's (SLMSTACK_CPU_KERNELS=off)
FORMATS = ["auto", "auto@torch", "dense", "float16-weights", "bfloat16-weights", "int8-weights", "int4-weights",
           "dense+compile", "int4-weights+compile"]  # fmt: skip


GREEDY_PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.", "What is the capital of France?",
    "Explain photosynthesis to a child.", "Give three tips for learning a new language.",
    "Why is the sky blue?", "Write a haiku about autumn leaves.", "How do vaccines work?",
    "Describe the water cycle in a few sentences.", "What is the difference between a virus and a bacterium?",
    "Write a short poem about the sea.", "How does a bicycle stay upright?", "What causes the seasons on Earth?",
    "List four healthy breakfast ideas.", "Explain what a prime number is.", "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet.", "How do airplanes fly?", "What is machine learning?",
    "Give advice for a job interview.", "Describe a sunset over the mountains.",
]  # fmt: skip


def chat_ids(tokenizer, content: str) -> list[int]:
    """A user turn in the chat template (the plain text for a base model without one)."""
    if not tokenizer.chat_template:
        return tokenizer(content)["input_ids"]
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_texts(lm, fmt: str, tokens: int = 48) -> list[str]:
    """Greedy text of :data:`GREEDY_PROMPTS` under ``fmt``, all in one batch."""
    from slmstack.engine import Engine
    from slmstack.stack.config import GenerationSettings

    engine = Engine(lm.model, lm.tokenizer, weights=fmt, max_batch=len(GREEDY_PROMPTS))
    handles = [engine.submit(chat_ids(lm.tokenizer, p), None, GenerationSettings(max_new_tokens=tokens))
               for p in GREEDY_PROMPTS]  # fmt: skip
    engine.run()
    return [h.generated().text for h in handles]


def greedy_agreement(lm, fmt: str, tokens: int = 48) -> dict:
    """Greedy text under ``fmt`` against float32's (the engine's dense format) on :data:`GREEDY_PROMPTS`."""
    texts = {}
    for name in (fmt, "dense"):
        texts[name] = greedy_texts(lm, name, tokens)
    same = sum(a == b for a, b in zip(texts[fmt], texts["dense"], strict=True))
    return {"prompts": len(GREEDY_PROMPTS), "tokens": tokens, "equal": same, "of": f"{same}/{len(GREEDY_PROMPTS)}"}


def prompt_ids(tokenizer) -> list[int]:
    """The timed prompt (the plain text for a base model such as Gemma 3 270M)."""
    return chat_ids(tokenizer, GREEDY_PROMPTS[0])


def _decode_rate(timed, tokens: int, repeats: int, batch: int = 1) -> dict:
    warm = timed(4)  # warm-up (compiling, where decode steps are compiled)
    timed(tokens)  # the cache at its full length (compiled steps compile again for it)
    one = statistics.median(timed(1) for _ in range(3))
    full = statistics.median(timed(tokens) for _ in range(repeats))
    return {
        "decode_tokens_per_s": round(batch * (tokens - 1) / (full - one), 2),  # every row's tokens
        "prefill_s": round(one, 4),
        "first_call_s": round(warm, 2),
    }


def child_engine(spec: str, tokens: int, repeats: int, threads: int, model: str = "default", batch: int = 1) -> dict:
    if "+compile" in spec:  # a cold compile: first_call_s is the start-up cost a user sees the first time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="slmstack-inductor-")
    spec, _, kernel = spec.partition("@")
    if kernel == "torch":
        os.environ["SLMSTACK_CPU_KERNELS"] = "off"
    import torch

    from slmstack.engine import Engine
    from slmstack.models import load_model
    from slmstack.stack.config import GenerationSettings

    torch.set_num_threads(threads)
    fmt, _, compiled = spec.partition("+")
    lm = load_model(model, device="cpu")
    engine = Engine(lm.model, lm.tokenizer, weights=fmt, max_batch=batch, graphs="compile" if compiled else "auto")
    ids = prompt_ids(lm.tokenizer)

    def timed(n: int) -> float:
        start = time.perf_counter()
        for _ in range(batch):
            handle = engine.submit(ids, None, GenerationSettings(max_new_tokens=n))
            handle.request.eos = frozenset()  # exactly n tokens
        engine.run()
        return time.perf_counter() - start

    out = _decode_rate(timed, tokens, repeats, batch)
    handle = engine.submit(ids, None, GenerationSettings(max_new_tokens=48))
    engine.run()
    text = handle.generated().text
    if fmt != "dense" and not compiled:  # (the teacher-forced pass runs eagerly: compiled steps add nothing)
        out["logits_vs_float32"] = _teacher_forced(engine, Engine(lm.model, lm.tokenizer, max_batch=1), ids)
        if model == "default" and batch == 1:
            out["greedy_vs_float32"] = greedy_agreement(lm, fmt)
    if fmt == "dense" and not compiled and model == "default" and batch == 1:
        out["greedy_texts"] = greedy_texts(lm, "dense")  # what llama.cpp's text is held to
    out["weights"] = engine.weights.describe()
    label = spec + (" @torch" if kernel else "")
    return {"engine": f"slmstack engine ({label})", "batch": batch, "prompt_tokens": len(ids), **out, "text": text}


def _teacher_forced(engine, dense, ids: list[int]) -> dict:
    """``engine``'s logits against float32's over the prompt's last token and float32's 48 greedy tokens.

    Each row's error is its largest difference over the row's largest float32 logit; ``top1_changed``: the positions
    whose most likely token differs.
    """
    import torch

    from slmstack.engine.scheduler import Request, Row, StepPlan
    from slmstack.stack.config import GenerationSettings

    handle = dense.submit(ids, None, GenerationSettings(max_new_tokens=48))
    dense.run()
    full = ids + handle.request.output

    def logits(e) -> torch.Tensor:
        e.cache.ensure(len(full))
        request = Request(full)
        request.slot = 0
        step = e.runner.step_input(StepPlan([], [Row(request, 0, full, True)]))
        step.sample = torch.arange(len(ids) - 1, len(full))
        return e.runner.decoder.forward(step)

    ref, got = logits(dense), logits(engine)
    err = (got - ref).abs().amax(-1) / ref.abs().amax(-1)
    return {
        "positions": len(ref),
        "mean_rel_err": round(err.mean().item(), 4),
        "max_rel_err": round(err.max().item(), 4),
        "top1_changed": int((got.argmax(-1) != ref.argmax(-1)).sum()),
    }


def child_hf(tokens: int, repeats: int, threads: int, model: str = "default", batch: int = 1) -> dict:
    import torch

    from slmstack.engine.hf import generate_batch
    from slmstack.models import load_model
    from slmstack.stack.config import GenerationSettings

    torch.set_num_threads(threads)
    lm = load_model(model, device="cpu")
    ids = torch.tensor([prompt_ids(lm.tokenizer)] * batch)  # equal prompts: no padding

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)  # fmt: skip
        return time.perf_counter() - start

    out = _decode_rate(timed, tokens, repeats, batch)
    text = lm.tokenizer.decode(ids[0])
    if model == "default":
        settings = GenerationSettings(max_new_tokens=48)
        greedy = generate_batch(lm.model, lm.tokenizer, [text], settings, chat=True)[0].text
    else:  # the prompt's own tokens (a base model's text would gain a second BOS)
        with torch.inference_mode():
            new = lm.model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=48,
                                    do_sample=False)[0, ids.shape[1] :]  # fmt: skip
        greedy = lm.tokenizer.decode(new, skip_special_tokens=True).strip()
    return {"engine": "transformers generate (float32)", "batch": batch, "prompt_tokens": ids.shape[1], **out,
            "text": greedy}  # fmt: skip


def child_llama_cpp(spec: str, tokens: int, repeats: int, threads: int) -> dict:
    """``spec``: JSON with the GGUF path and the prompt text (this child may run without slmstack installed)."""
    from llama_cpp import Llama

    spec = json.loads(spec)
    llm = Llama(model_path=spec["gguf"], n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    ids = llm.tokenize(spec["text"].encode(), add_bos=False, special=True)

    def timed(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(ids, temp=0.0, reset=True)):
            if i + 1 >= n:
                break
        return time.perf_counter() - start

    import llama_cpp

    texts = []
    for prompt in spec.get("greedy", []):  # greedy text of each chat-formatted prompt, 48 tokens or to its EOS
        out = []
        for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), temp=0.0, reset=True):
            if token == llm.token_eos() or len(out) >= 48:
                break
            out.append(token)
        texts.append(llm.detokenize(out).decode("utf-8", errors="replace").strip())
    return {"engine": f"llama.cpp {llama_cpp.__version__} (Q4_1 GGUF)", "prompt_tokens": len(ids),
            **_decode_rate(timed, tokens, repeats), "greedy_texts": texts}  # fmt: skip


def child_lora(rows: int, threads: int, repeats: int) -> dict:
    """One decode step, ``rows`` rows over 4 adapters: grouped (the engine's) vs gathered bmm vs the bare base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slmstack.arch import get_arch
    from slmstack.engine import Engine
    from slmstack.engine import lora as lora_mod
    from slmstack.models import load_model
    from slmstack.stack.config import GenerationSettings

    torch.set_num_threads(threads)
    lm = load_model("default", device="cpu")
    targets = get_arch(lm.model).lora_targets
    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, target_modules=targets), adapter_name="a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    engine = Engine(model, lm.tokenizer, max_batch=rows)
    ids = prompt_ids(lm.tokenizer)

    def step_time(adapters: list[str | None]) -> float:
        handles = [engine.submit(ids, a, GenerationSettings(max_new_tokens=64)) for a in adapters]
        for h in handles:
            h.request.eos = frozenset()
        while any(h.request.computed < len(ids) for h in handles):
            engine.step()  # prefill
        for _ in range(3):
            engine.step()
        times = []
        for _ in range(repeats * 5):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        for h in handles:
            h.cancel()
        engine.run()
        return statistics.median(times)

    mixed = [f"a{i % 4}" for i in range(rows)]
    stacked = step_time(mixed)
    base = step_time([None] * rows)
    single = step_time(["a0"] * rows)

    def grouped(out, x, layer, module, bank, step):  # rows grouped by adapter: an index_add_ per group
        if step.single is not None or step.rows is None or step.runs:  # one adapter, or prompt chunks (not timed)
            return real(out, x, layer, module, bank, step)
        for aid in step.rows.unique().tolist():
            f = bank.factors[aid][layer].get(module) if aid else None
            if f is not None:
                idx = (step.rows == aid).nonzero()[:, 0]
                out.index_add_(0, idx, (x.index_select(0, idx) @ f.a_t) @ f.b_t)

    def gathered(out, x, layer, module, bank, step):  # each row's factors gathered, one bmm per product
        if step.single is not None or step.rows is None or step.runs:  # one adapter, or prompt chunks (not timed)
            return real(out, x, layer, module, bank, step)
        ids = sorted(bank.factors)
        a = torch.stack([bank.factors[aid][layer][module].a_t for aid in ids])  # (n_ad, in, R)
        b = torch.stack([bank.factors[aid][layer][module].b_t for aid in ids])  # (n_ad, R, out)
        pick = step.rows - 1
        out += torch.bmm(torch.bmm(x[:, None, :], a[pick]), b[pick])[:, 0]

    import slmstack.engine.model as model_mod

    real = lora_mod.lora_add
    timings = {}
    for name, fn in (("grouped", grouped), ("gathered_bmm", gathered)):
        model_mod.lora_add = fn
        try:
            timings[name] = step_time(mixed)
        finally:
            model_mod.lora_add = real
    ms = {"stacked_masked (the engine's)": stacked, **timings, "one adapter for every row": single,
          "bare base": base}  # fmt: skip
    return {"rows": rows, "adapters": 4, "rank": 8, "step_ms": {k: round(v * 1000, 2) for k, v in ms.items()},
            "over_bare_base": {k: round(v / base, 3) for k, v in ms.items()}}  # fmt: skip


def child_attention(rows: int, threads: int, repeats: int) -> dict:
    """One layer's decode attention, ``rows`` rows of 192 keys on the default shape, by where the rows' slots lie.

    In place (row i in slot i); a quarter of the first slots idle, the rows' queries laid out by slot (what the
    engine does up to :data:`~slmstack.engine.runner.VIEW_SLOTS` x the rows), or the rows' keys and values copied
    out of the cache (what it does beyond). Median µs per call.
    """
    from types import SimpleNamespace

    import torch

    from slmstack.engine.model import Decoder, StepInput
    from slmstack.engine.options import EngineOptions

    owner = SimpleNamespace(options=EngineOptions(decode_kernel="sdpa"))  # what the method reads of its decoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    heads, kv, hd, length = 9, 3, 64, 192
    m = rows * 4 // 3
    cache = torch.randn(m + 1, kv, 2, 512, hd)
    q = torch.randn(rows, heads, hd)
    slots = sorted(torch.randperm(m)[:rows].tolist())
    row_of = [0] * m
    for i, s in enumerate(slots):
        row_of[s] = i

    def step(decode_slots: list[int] | None, view: list[int] | None) -> StepInput:
        longs = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
        n = len(view) if view else rows
        return StepInput(tokens=torch.zeros(rows, dtype=torch.long), positions=torch.zeros(rows, dtype=torch.long),
                         slots=torch.zeros(rows, dtype=torch.long),
                         n_decode=rows, decode_slots=longs(decode_slots), decode_lens=torch.full((n,), length),
                         decode_length=length, decode_view=longs(view))  # fmt: skip

    def median_us(s: StepInput) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(repeats * 50):
                start = time.perf_counter()
                Decoder._decode_attention(owner, q, cache, s, None)
                times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1e6, 1)

    us = {"in place (row i in slot i)": median_us(step(None, None)),
          f"laid out by slot ({m} slots)": median_us(step(slots, row_of)),
          "copied out of the cache": median_us(step(slots, None))}  # fmt: skip
    return {"rows": rows, "keys": length, "layer_us": us}


def child_eval(engine: str, data_dir: str, threads: int, work: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    from slmstack.cli import main

    out = Path(work) / f"eval-{engine}.json"
    start = time.perf_counter()
    code = main(["eval", "--tasks", "arc_easy,hellaswag", "--subset", "tiny", "--data-dir", data_dir, "--engine",
                 engine, "--out", str(out)])  # fmt: skip
    wall = time.perf_counter() - start
    result = json.loads(out.read_text())
    return {"engine": engine, "exit": code, "wall_s": round(wall, 1),
            "acc": {t: r.get("acc_norm", r.get("acc")) for t, r in result["tasks"].items()}}  # fmt: skip


def run_child(kind: str, args: argparse.Namespace, *extra: str, python: str | None = None) -> dict | None:
    cmd = [python or sys.executable, __file__, "--child", kind, "--tokens", str(args.tokens), "--repeats",
           str(args.repeats), "--threads", str(args.threads), "--batch", str(args.batch), *extra]  # fmt: skip
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONPATH": str(HERE.parent / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{kind} {' '.join(extra)} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--llama-cpp-python", default=None, help="an interpreter that has llama-cpp-python")
    p.add_argument("--eval", action="store_true", help="also time stack evaluation on both paths (long)")
    p.add_argument("--eval-only", action="store_true", help="only the stack evaluation (into --out)")
    p.add_argument("--attention-only", action="store_true", help="only the decode-attention row (into --out)")
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared/data"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "engine.json")
    p.add_argument("--model", default="default", help="another model: batch-1 and --batch decode, HF and engine")
    p.add_argument("--batch", type=int, default=32, help="the larger batch, with --model")
    p.add_argument("--child", default=None)
    p.add_argument("--arg", default=None)
    args = p.parse_args()
    if args.child:
        result = {
            "engine": lambda: child_engine(args.arg, args.tokens, args.repeats, args.threads, args.model, args.batch),
            "hf": lambda: child_hf(args.tokens, args.repeats, args.threads, args.model, args.batch),
            "llama_cpp": lambda: child_llama_cpp(args.arg, args.tokens, args.repeats, args.threads),
            "lora": lambda: child_lora(args.rows, args.threads, args.repeats),
            "attention": lambda: child_attention(args.rows, args.threads, args.repeats),
            "eval": lambda: child_eval(args.arg, args.data_dir, args.threads, str(args.out.parent)),
        }[args.child]()
        print(json.dumps(result))
        return

    from slmstack.io import atomic_write_json

    if args.eval_only:
        runs = {e: run_child("eval", args, "--arg", e) for e in ("auto", "hf")}
        if runs["auto"] and runs["hf"]:
            runs["engine_over_hf_wall"] = round(runs["auto"]["wall_s"] / runs["hf"]["wall_s"], 3)
        settings = {k: str(v) for k, v in vars(args).items() if v is not None}
        atomic_write_json(args.out, {"benchmark": "engine", "settings": settings, "stack_eval_tiny": runs})
        print(json.dumps(runs, indent=1))
        print(f"wrote {args.out}")
        return
    if args.attention_only:
        attention = run_child("attention", args, "--rows", "32")
        settings = {k: str(v) for k, v in vars(args).items() if v is not None}
        atomic_write_json(args.out, {"benchmark": "engine", "settings": settings, "decode_attention": attention})
        _print_attention(attention)
        print(f"wrote {args.out}")
        return
    if args.model != "default":
        model_decode(args)
        return
    args.batch = 1
    decode = {"hf_float32": run_child("hf", args)}
    for fmt in args.formats.split(","):
        decode[f"engine_{fmt}"] = run_child("engine", args, "--arg", fmt)
    from slmstack.models import default_gguf_path, load_model

    tok = load_model("default", device="cpu").tokenizer
    greedy = [tok.decode(chat_ids(tok, p)) for p in GREEDY_PROMPTS]
    spec = json.dumps({"gguf": str(default_gguf_path()), "text": tok.decode(prompt_ids(tok)), "greedy": greedy})
    decode["llama_cpp"] = run_child("llama_cpp", args, "--arg", spec, python=args.llama_cpp_python)
    dense = (decode.get("engine_dense") or {}).get("greedy_texts")
    if decode["llama_cpp"] and dense:  # llama.cpp's greedy text against the engine's float32 text
        same = sum(a.strip() == b.strip() for a, b in zip(decode["llama_cpp"]["greedy_texts"], dense, strict=True))
        decode["llama_cpp"]["greedy_vs_float32"] = {"prompts": len(dense), "equal": same, "of": f"{same}/{len(dense)}"}
    ref = decode["llama_cpp"]["decode_tokens_per_s"] if decode["llama_cpp"] else None
    hf = decode["hf_float32"]["decode_tokens_per_s"]
    for row in decode.values():
        if row:
            row["over_hf_float32"] = round(row["decode_tokens_per_s"] / hf, 2)
            row["over_llama_cpp"] = round(row["decode_tokens_per_s"] / ref, 3) if ref else None
            if "text" in row:  # 48 greedy tokens against transformers' float32 text
                same = os.path.commonprefix([row["text"], decode["hf_float32"]["text"]])
                row["greedy_equals_hf_float32"] = row["text"] == decode["hf_float32"]["text"]
                row["greedy_same_chars"] = f"{len(same)}/{len(decode['hf_float32']['text'])}"
    settings = {k: str(v) for k, v in vars(args).items() if v is not None}
    lora = run_child("lora", args, "--rows", str(args.rows))
    attention = run_child("attention", args, "--rows", "32")
    report: dict = {"benchmark": "engine", "settings": settings, "decode_batch_1": decode, "lora_step": lora,
                    "decode_attention": attention}  # fmt: skip
    if args.eval:
        report["stack_eval_tiny"] = {e: run_child("eval", args, "--arg", e) for e in ("auto", "hf")}
        runs = report["stack_eval_tiny"]
        if runs["auto"] and runs["hf"]:
            runs["engine_over_hf_wall"] = round(runs["auto"]["wall_s"] / runs["hf"]["wall_s"], 3)
    atomic_write_json(args.out, report)
    print(f"{'batch-1 decode (default model, 2-core CPU)':<52}{'tok/s':>8}{'x HF fp32':>11}{'x llama.cpp':>13}"
          f"{'greedy text = HF':>18}{'logits err mean/max, top-1 changed':>36}{'first call s':>14}"
          f"{'20 prompts = fp32':>19}")  # fmt: skip
    for row in decode.values():
        if row:
            forced = row.get("logits_vs_float32")
            forced = "-" if not forced else (f"{forced['mean_rel_err']}/{forced['max_rel_err']}, "
                                             f"{forced['top1_changed']} of {forced['positions']}")  # fmt: skip
            print(f"{row['engine']:<52}{row['decode_tokens_per_s']:>8}{row['over_hf_float32']:>11}"
                  f"{row['over_llama_cpp'] if row['over_llama_cpp'] is not None else '-':>13}"
                  f"{row.get('greedy_same_chars', '-'):>18}{forced:>36}"
                  f"{row.get('first_call_s', '-'):>14}"
                  f"{row.get('greedy_vs_float32', {}).get('of', '-'):>19}")  # fmt: skip
    lora = report["lora_step"]
    if lora:
        print(f"decode step of {lora['rows']} rows, 4 rank-8 adapters mixed:")
        for name, ms in lora["step_ms"].items():
            print(f"  {name:<34}{ms:>8} ms  x{lora['over_bare_base'][name]} of the bare base")
    _print_attention(attention)
    if args.eval:
        print(json.dumps(report["stack_eval_tiny"], indent=1))
    print(f"wrote {args.out}")


def model_decode(args: argparse.Namespace) -> None:
    """``--model``: batch-1 and ``--batch`` decode, transformers ``generate`` against the engine in ``--formats``."""
    from slmstack.io import atomic_write_json

    rows = {}
    for batch in (1, args.batch):
        args.batch = batch
        hf = rows[f"hf_float32_b{batch}"] = run_child("hf", args, "--model", args.model, "--batch", str(batch))
        for fmt in args.formats.split(","):
            row = run_child("engine", args, "--arg", fmt, "--model", args.model, "--batch", str(batch))
            if row and hf:
                row["over_hf_float32"] = round(row["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 2)
                row["greedy_equals_hf_float32"] = row["text"] == hf["text"]
            rows[f"engine_{fmt}_b{batch}"] = row
    settings = {k: str(v) for k, v in vars(args).items() if v is not None}
    atomic_write_json(args.out, {"benchmark": "engine", "settings": settings, "decode": rows})
    print(f"{'decode (' + args.model + ', CPU)':<44}{'rows':>6}{'tok/s':>9}{'x HF fp32':>11}{'greedy = HF':>13}")
    for row in rows.values():
        if row:
            print(
                f"{row['engine']:<44}{row['batch']:>6}{row['decode_tokens_per_s']:>9}"
                f"{row.get('over_hf_float32', '-'):>11}{str(row.get('greedy_equals_hf_float32', '-')):>13}"
            )
    print(f"wrote {args.out}")


def _print_attention(attention: dict | None) -> None:
    if attention:
        print(f"decode attention of {attention['rows']} rows, {attention['keys']} keys, one layer:")
        for name, us in attention["layer_us"].items():
            print(f"  {name:<34}{us:>8} µs")


if __name__ == "__main__":
    main()
