"""The GPU check: the unit suite on the GPU, then a speed probe on a random-weight model of the default's shape.

Made for an offline H100/H200-class machine (well under 5 minutes there); it also runs on a CPU, with a smaller
probe (``--device cpu``). One JSON (``--out``) holds the suite's counts and the probe's figures:

1. **Unit suite** on the device (``device: auto`` picks CUDA): ``pytest -m "not slow" tests/unit``, its
   passed / failed / skipped counts and every skip reason (tests that need a package the machine lacks skip).
2. **Speed probe** on ``LlamaForCausalLM`` with SmolLM2-135M's configuration and random weights (the default model's
   94 MB of weights do not travel), a character tokenizer, float32 (``dtype: auto``):
   - decode tokens/s at batch 1 and batch 64, slmstack's engine (CUDA graphs on a GPU) and transformers ``generate``;
   - the default 4-stage stack, a random LoRA on every stage, ``--questions`` questions batched, against the same
     prompts on the bare base (tokens/s ratio);
   - LoRA training tokens/s (``precision: auto``: bf16 autocast on a GPU) and whether the loss stays finite;
   - the profile (``profile``): a decode step's time, graph replay and kernels, at batch 1 and at 16 rows (bare
     base, and 4 LoRA adapters mixed), each with and without the engine's Triton kernels where they run.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check_cpu.json  # here, to show it runs

docs/architecture.md says which wheels to carry to a machine that lacks packages.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


def run_suite(args: argparse.Namespace) -> dict:
    """The unit tests on this machine, counted from pytest's JUnit XML (from its verbose log if it runs out of
    time: the log, ``<workdir>/suite.log``, is written as the tests run)."""
    import importlib.util

    xml, log = Path(args.workdir) / "junit.xml", Path(args.workdir) / "suite.log"
    per_test = ["--timeout=120"] if importlib.util.find_spec("pytest_timeout") else []
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-m",
        "not slow",
        "tests/unit",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        *per_test,
        *(["-x"] if args.fail_fast else []),
    ]
    start = time.perf_counter()
    with open(log, "w") as sink:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=args.suite_timeout)
        except subprocess.TimeoutExpired:
            code = None
    text = log.read_text(errors="replace")
    if code is None:
        counts = {k: text.count(f" {k.upper()}") for k in ("passed", "failed", "error", "skipped")}
        failed = [line.split(" ")[0] for line in text.splitlines() if " FAILED" in line or " ERROR" in line]
        return {"exit": None, "timed_out_after_s": args.suite_timeout, **counts, "failed_tests": failed,
                "tail": text[-3000:]}  # fmt: skip
    done = subprocess.CompletedProcess(cmd, code.returncode, stdout=text)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skipped, messages = [], {}, {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed" if case.find("failure") is not None else "errors"] += 1
            failed.append(name)
            messages[name] = (bad.get("message") or "")[:400] + " | " + (bad.text or "")[-1200:]
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {
        "exit": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        **counts,
        "failed_tests": failed,
        "failure_messages": messages,
        "skip_reasons": skipped,
        "tail": done.stdout[-1500:],
    }


def probe_model(device: str, layers: int | None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tokenizer

    torch.manual_seed(0)
    cfg = dict(SMOLLM2_135M)
    if layers:
        cfg["num_hidden_layers"] = layers
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}}
    model = LlamaForCausalLM(LlamaConfig(**cfg, **rope)).to(device).eval()
    return model, build_tokenizer()


def decode_probe(model, tok, batch: int, tokens: int, engine: bool, graphs: str = "auto") -> dict:
    """Decode tokens/s at ``batch`` rows (prompt excluded), on the engine or transformers ``generate``, and the
    first call's seconds (on the engine on a GPU: CUDA-graph capture included).

    The engine's decode is timed from the step after every row has its first token to the end (the tokens it
    made in that time); ``generate``'s as the difference between a ``tokens``-token and a 1-token call.
    """
    import torch

    from slmstack.engine import Engine
    from slmstack.stack.config import GenerationSettings

    prompt = tok("Write a long story about a lighthouse keeper and a storm.")["input_ids"]
    if engine:
        eng = Engine(model, tok, max_batch=batch, graphs=graphs)

        def timed(n: int) -> tuple[float, int]:
            """Seconds and tokens from the step after the last prompt is in (every row has its first token) to the
            end: decode steps alone."""
            handles = [eng.submit(prompt, None, GenerationSettings(max_new_tokens=n)) for _ in range(batch)]
            for h in handles:
                h.request.eos = frozenset()
            while any(not h.request.output for h in handles):
                eng.step()
            sync(model)
            before, start = eng.tokens_decoded, time.perf_counter()
            eng.run()
            sync(model)
            return time.perf_counter() - start, eng.tokens_decoded - before
    else:
        ids = torch.tensor([prompt] * batch, device=model.device)

        def timed(n: int) -> float:
            sync(model)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            sync(model)
            return time.perf_counter() - start

    start = time.perf_counter()
    timed(4)
    first = time.perf_counter() - start
    timed(tokens)  # warm-up (graphs captured)
    if engine:
        seconds, decoded = timed(tokens)
        return {"tokens_per_s": round(decoded / seconds, 1), "first_call_s": round(first, 3)}
    one, full = timed(1), timed(tokens)
    return {"tokens_per_s": round(batch * (tokens - 1) / (full - one), 1), "first_call_s": round(first, 3)}


def sync(model) -> None:
    import torch

    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def stack_probe(model, tok, questions: int, workdir: Path) -> dict:
    """The default stack with a random LoRA on every stage, batched, against the bare base on the same prompts."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slmstack.stack.config import load_stack_config
    from slmstack.stack.runtime import Stack

    base_cfg = load_stack_config()
    path = workdir / "probe_model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for stage in base_cfg.stages:
        torch.manual_seed(len(stage.name))
        from transformers import AutoModelForCausalLM

        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(path),
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        )
        peft.save_pretrained(workdir / f"lora_{stage.name}")
    texts = [f"question {i}: why is the sky blue and the grass green?" for i in range(questions)]
    out = {}
    for mode in ("base", "stack"):
        cfg = load_stack_config(None, [f"model={path}", f"batch_size={questions}", "chat_template=false"])
        if mode == "stack":
            for stage in cfg.stages:
                stage.adapter = str(workdir / f"lora_{stage.name}")
        stack = Stack(cfg)
        stack.run_batch(texts[:4])  # warm-up
        sync(stack.model)
        start = time.perf_counter()
        results = stack.run_batch(texts)
        sync(stack.model)
        wall = time.perf_counter() - start
        generated = sum(t.tokens_out for r in results for t in r.trace)
        engine = stack.backend.engine
        out[mode] = {
            "tokens": generated,
            "seconds": round(wall, 2),
            "tokens_per_s": round(generated / wall, 1),
            "engine": stack.on_engine,
            "steps": engine.steps if engine is not None else None,  # warm-up included
            "graph_replays": engine.runner.graphs.replays if engine is not None and engine.runner.graphs else None,
        }
    out["stack_over_base"] = round(out["stack"]["tokens_per_s"] / out["base"]["tokens_per_s"], 3)
    return out


def profile_probe(device: str, layers: int | None, tok, compile_too: bool) -> dict:
    """Where a decode step's time goes on the engine: the whole step, the graph's replay alone (the rest is the
    host: scheduler, copies, sampling), and the kernels one step launches, by name. At 1 row on the bare base,
    and at 16 rows over 4 LoRA adapters mixed (each on q, v, down) against 16 rows on the bare base. With
    ``compile_too``, batch 1 again with the static step compiled by ``torch.compile`` before capture (an
    experiment: what kernel fusion would give)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from slmstack.engine import Engine
    from slmstack.engine.kernels import kernel_available
    from slmstack.stack.config import GenerationSettings

    prompt = tok("Write a long story about a lighthouse keeper and a storm.")["input_ids"]

    def breakdown(engine, rows: int, adapters: list[str | None]) -> dict:
        handles = [engine.submit(prompt, adapters[i % len(adapters)], GenerationSettings(max_new_tokens=400))
                   for i in range(rows)]  # fmt: skip
        for h in handles:
            h.request.eos = frozenset()
        start = time.perf_counter()
        for _ in range(20):  # prompt, capture, warm-up
            engine.step()
        sync(model)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(100):
            engine.step()
        sync(model)
        step_ms = (time.perf_counter() - start) * 10
        graphs = engine.runner.graphs
        bucket = next(b for b in graphs.buckets if b >= rows)
        graph, _host, buffers, _logits, _best = graphs.graphs[bucket]
        start = time.perf_counter()
        for _ in range(100):
            graph.replay() if graph is not None else graphs._forward(buffers)
        sync(model)
        replay_ms = (time.perf_counter() - start) * 10
        kind = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[kind]) as prof:
            graphs._forward(buffers)
            sync(model)
        kernels: dict[str, list[float]] = {}
        for event in prof.events():
            if str(event.device_type).endswith("CUDA") or (device == "cpu" and event.cpu_parent is None):
                entry = kernels.setdefault(event.name[:90], [0, 0.0])
                entry[0] += 1
                entry[1] += float(event.device_time or 0)
        engine.cancel_all()
        engine.run()
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
        return {"rows": rows, "first_20_steps_s": round(first, 2), "step_ms": round(step_ms, 3),
                "replay_ms": round(replay_ms, 3), "host_ms": round(step_ms - replay_ms, 3),
                "kernels_per_step": sum(v[0] for v in kernels.values()),
                "top_kernels": [{"name": k, "count": v[0], "us": round(v[1], 1)} for k, v in top]}  # fmt: skip

    out = {}
    mode = "auto" if device == "cuda" else "static"  # on a CPU: the static path, eagerly
    model, _ = probe_model(device, layers)
    out["batch_1"] = breakdown(Engine(model, tok, max_batch=1, graphs=mode), 1, [None])
    if kernel_available(torch.device(device), "rope"):  # RoPE and the cache write in torch's kernels instead
        out["batch_1_torch_rope"] = breakdown(Engine(model, tok, max_batch=1, graphs=mode,
                                                     no_triton=frozenset({"rope"})), 1, [None])  # fmt: skip
    out["batch_16_base"] = breakdown(Engine(model, tok, max_batch=16, graphs=mode), 16, [None])
    names = [f"a{i}" for i in range(4)]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False), adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        peft.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                          init_lora_weights=False))  # fmt: skip
    out["batch_16_mixed_lora"] = breakdown(Engine(peft, tok, max_batch=16, graphs=mode), 16, names)
    out["mixed_over_base_step"] = round(out["batch_16_base"]["step_ms"] / out["batch_16_mixed_lora"]["step_ms"], 3)
    out["lora_kernel"] = kernel_available(torch.device(device), "lora")
    if out["lora_kernel"]:  # the same mix in the masked form (three products and a mask per projection)
        out["batch_16_mixed_masked"] = breakdown(Engine(peft, tok, max_batch=16, graphs=mode,
                                                        no_triton=frozenset({"lora"})), 16, names)  # fmt: skip
        out["masked_over_base_step"] = round(
            out["batch_16_base"]["step_ms"] / out["batch_16_mixed_masked"]["step_ms"], 3
        )
    if compile_too:
        from slmstack.engine.model import Decoder

        model, _ = probe_model(device, layers)
        engine = Engine(model, tok, max_batch=1, graphs=mode)
        eager_forward = Decoder.forward.__wrapped__  # torch.compile traces no_grad, not inference_mode
        compiled = torch.compile(engine.runner.graphs._forward)
        Decoder.forward = torch.no_grad()(eager_forward)
        engine.runner.graphs._forward = compiled
        try:
            start = time.perf_counter()
            out["batch_1_compiled"] = breakdown(engine, 1, [None])
            out["batch_1_compiled"]["compile_and_run_s"] = round(time.perf_counter() - start, 1)
        finally:
            Decoder.forward = torch.inference_mode()(eager_forward)
    return out


def train_probe(model, steps: int, batch: int, length: int) -> dict:
    """LoRA training on random sequences (prompt half masked): tokens/s and whether the loss stays finite."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model

    from slmstack.models import resolve_precision
    from slmstack.training.train_data import IGNORE_INDEX, TokenizedExample
    from slmstack.training.trainer import TrainingDivergedError, train_lora_steps

    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(batch * 4):
        n = length - (i % 7) * 8
        ids = [1] + torch.randint(10, 49000, (n - 1,), generator=gen).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    peft = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    precision = resolve_precision("auto", next(model.parameters()).device)
    try:
        stats = train_lora_steps(peft, 2, examples, steps, batch, 2e-4, seed=0, precision="auto")
        finite, error = math.isfinite(stats["loss"]), None
    except TrainingDivergedError as exc:
        stats, finite, error = {"tokens": 0, "seconds": 1, "loss": float("nan")}, False, str(exc)
    return {
        "precision": precision,
        "steps": steps,
        "batch": batch,
        "max_length": length,
        "tokens_per_s": round(stats["tokens"] / stats["seconds"], 1),
        "mean_loss": stats["loss"],
        "finite": finite,
        "error": error,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="a small probe (4 layers, fewer tokens): for a CPU")
    p.add_argument("--skip-suite", action="store_true")
    p.add_argument("--fail-fast", action="store_true")
    p.add_argument("--suite-timeout", type=int, default=240)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--questions", type=int, default=128)
    p.add_argument(
        "--sections",
        default="decode,bfloat16,stack,train,profile",
        help="which probes to run (add 'compile' to try torch.compile in the profile)",
    )
    p.add_argument("--workdir", default="/tmp/slmstack-gpu-check")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    args = p.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    report: dict = {
        "benchmark": "gpu_check",
        "device": device,
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    from slmstack.io import atomic_write_json

    if not args.skip_suite:
        report["suite"] = run_suite(args)
        atomic_write_json(args.out, report)  # kept if a probe below dies
    layers, tokens = (4, 32) if args.quick else (None, args.tokens)
    questions = 16 if args.quick else args.questions
    model, tok = probe_model(device, layers)
    report["probe"] = {
        "model": f"random-weight SmolLM2-135M shape, {layers or 30} layers, float32",
        "decode_tokens_per_s": {},
    }

    def attempt(fn, *fn_args, **kwargs):
        """One probe; its error (the traceback's tail) goes into the report instead of ending the check."""
        try:
            return fn(*fn_args, **kwargs)
        except Exception:  # noqa: BLE001 - a check reports every failure it meets
            import traceback

            return {"error": traceback.format_exc()[-2000:]}
        finally:
            atomic_write_json(args.out, report)

    sections = set(args.sections.split(","))
    paths = [("engine", True, "auto"), ("hf_generate", False, "auto")] if "decode" in sections else []
    if device == "cuda" and paths:
        paths.insert(1, ("engine_no_graphs", True, "off"))
    batches = (1, 64 if not args.quick else 8)
    for name, engine, graphs in paths:
        for batch in batches:
            report["probe"]["decode_tokens_per_s"][f"{name}_batch_{batch}"] = attempt(
                decode_probe, model, tok, batch, tokens, engine, graphs
            )
    if "bfloat16" in sections:  # what the float32 default costs: the same decode with bfloat16 weights
        import torch

        half = probe_model(device, layers)[0].to(torch.bfloat16)
        for batch in batches:
            report["probe"]["decode_tokens_per_s"][f"engine_bfloat16_batch_{batch}"] = attempt(
                decode_probe, half, tok, batch, tokens, True, "auto"
            )
        del half
    if "stack" in sections:
        report["probe"]["stack"] = attempt(stack_probe, model, tok, questions, Path(args.workdir))
    if "profile" in sections:
        report["probe"]["profile"] = attempt(profile_probe, device, layers, tok, "compile" in sections)
    if "train" in sections:
        model, _ = probe_model(device, layers)
        steps, batch, length = (4, 4, 64) if args.quick else (24, 16, 256)
        report["probe"]["train"] = attempt(train_probe, model, steps=steps, batch=batch, length=length)
    atomic_write_json(args.out, report)
    suite = report.get("suite")
    if suite and suite.get("exit") is None:
        print(f"unit suite on {device}: TIMED OUT after {suite['timed_out_after_s']} s: {suite['passed']} passed, "
              f"{suite['failed']} failed so far")  # fmt: skip
        for name in suite["failed_tests"]:
            print(f"  FAILED {name}")
    elif suite:
        print(
            f"unit suite on {device}: {suite['passed']} passed, {suite['failed']} failed, {suite['errors']} errors, "
            f"{suite['skipped']} skipped ({suite['seconds']} s)"
        )
        for name in suite["failed_tests"]:
            print(f"  FAILED {name}")
        for reason, n in suite["skip_reasons"].items():
            print(f"  skipped {n}: {reason[:100]}")
    probe = report["probe"]
    for key, rate in probe["decode_tokens_per_s"].items():
        if "tokens_per_s" not in rate:
            print(f"decode {key} failed:\n{rate['error']}")
        else:
            print(f"decode {key:<26}{rate['tokens_per_s']:>10} tokens/s   first call {rate['first_call_s']} s")
    stack, train = probe.get("stack", {"error": "not run"}), probe.get("train", {"error": "not run"})
    if stack.get("error") == "not run":
        pass
    elif "stack" not in stack:
        print(f"stack probe failed:\n{stack['error']}")
    else:
        print(f"stack {stack['stack']['tokens_per_s']} tokens/s vs bare base {stack['base']['tokens_per_s']}")
        print(f"stack over bare base: {stack['stack_over_base']}")
    if train.get("error") == "not run":
        pass
    elif "precision" not in train:
        print(f"training probe failed:\n{train['error']}")
    else:
        print(
            f"LoRA training ({train['precision']}): {train['tokens_per_s']} tokens/s, loss {train['mean_loss']:.3f}, "
            f"finite: {train['finite']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
