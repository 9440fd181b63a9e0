"""Evaluation speed: slmstack vs lm-eval's ``hf`` model on the same items, in the same run.

The default model on the ARC-Easy and HellaSwag tiny subsets (the fixed, seeded 100 items each). The
same items, with the same prompts, are written as an lm-eval custom task (``dataset_path: json``) and
run through ``lm_eval.simple_evaluate`` with ``HFLM`` on the same in-memory model. Both accuracies are
reported too: they must agree.

    python benchmarks/eval_speed.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def export_for_lm_eval(task: str, data_dir: Path, work: Path) -> str:
    """Write the tiny subset as query/choices/gold JSONL plus an lm-eval task YAML; return the task name."""
    from jinja2 import Template

    from slmstack.evaluation.tasks import get_task, load_docs, select_subset

    spec = get_task(task)
    docs = select_subset(load_docs(spec, data_dir), "tiny", None)
    rows = [{"query": Template(spec.text, keep_trailing_newline=True).render(**d.data), "choices": d.data["choices"],
             "gold": d.data["gold"]} for d in docs]  # fmt: skip
    path = work / f"{task}_tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"{task}_tiny_export"
    (work / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--tasks", default="arc_easy,hellaswag")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=HERE / "results" / "eval_speed.json")
    args = p.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from slmstack.evaluation.harness import evaluate
    from slmstack.evaluation.targets import ModelTarget
    from slmstack.io import atomic_write_json
    from slmstack.models import load_model

    work = Path(tempfile.mkdtemp(prefix="slmstack-eval-bench-"))
    lm = load_model("default", device="cpu", dtype="float32")
    rows = []
    for task in args.tasks.split(","):
        name = export_for_lm_eval(task, args.data_dir, work)
        t0 = time.perf_counter()
        ours = evaluate(ModelTarget(lm), [task], args.data_dir, "tiny", None, args.batch_size)["tasks"][task]
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size)
        theirs = simple_evaluate(model=hflm, tasks=[name], task_manager=TaskManager(include_path=str(work)))
        theirs_s = time.perf_counter() - t0
        res = theirs["results"][name]
        rows.append({"task": task, "items": ours["n"], "slmstack_s": round(ours_s, 1), "lm_eval_s": round(theirs_s, 1),
                     "speedup": round(theirs_s / ours_s, 2), "slmstack_acc": ours["acc"],
                     "lm_eval_acc": res["acc,none"], "slmstack_acc_norm": ours["acc_norm"],
                     "lm_eval_acc_norm": res["acc_norm,none"]})  # fmt: skip
    atomic_write_json(args.out, {"benchmark": "eval_speed", "model": "default (SmolLM2-135M-Instruct, fp32)",
                                 "batch_size": args.batch_size, "rows": rows})  # fmt: skip
    print(f"{'task':<12}{'items':>6}{'slmstack s':>12}{'lm-eval s':>11}{'speed-up':>10}{'acc (ours/lm-eval)':>22}"
          f"{'acc_norm (ours/lm-eval)':>26}")  # fmt: skip
    for r in rows:
        print(
            f"{r['task']:<12}{r['items']:>6}{r['slmstack_s']:>12}{r['lm_eval_s']:>11}{r['speedup']:>10}"
            f"{r['slmstack_acc']:>12.2f} / {r['lm_eval_acc']:.2f}"
            f"{r['slmstack_acc_norm']:>16.2f} / {r['lm_eval_acc_norm']:.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
