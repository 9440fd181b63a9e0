"""Accuracy on the first N items: slmstack's built-in tasks vs lm-eval's *own* task definitions, same run.

For each task, the first N local records are written back in the hub's layout (the converters of
``tests/unit/evaluation/test_lm_eval_tasks.py``) and lm-eval's registered task (its YAML, ``utils.py``,
preprocessing and delimiter; only the data source replaced) runs through ``lm_eval.simple_evaluate``
with ``HFLM`` on the same in-memory default model that ``slmstack.evaluation.evaluate`` scores. The
metrics must be equal.

    python benchmarks/lm_eval_tasks.py --data-dir ../shared/data --tasks hellaswag,boolq,copa --limit 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the converters live in the test suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--tasks", default="hellaswag,boolq,copa")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lm_eval_tasks.json")
    args = parser.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from slmstack.evaluation.harness import evaluate
    from slmstack.evaluation.targets import ModelTarget
    from slmstack.models import load_model
    from tests.unit.evaluation.test_lm_eval_tasks import lm_eval_task

    lm = load_model("default", device="cpu", dtype="float32")
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            start = time.perf_counter()
            ours = evaluate(ModelTarget(lm), [task], args.data_dir, None, args.limit, args.batch_size)["tasks"][task]
            ours_s = time.perf_counter() - start
            start = time.perf_counter()
            theirs = simple_evaluate(model=hflm, tasks=[lm_eval_task(task, args.data_dir, args.limit, Path(tmp))])
            theirs_s = time.perf_counter() - start
            (name, metrics), *_ = theirs["results"].items()
            for metric in ("acc", "acc_norm"):
                if metric in ours:
                    rows.append({"task": task, "metric": metric, "slmstack": ours[metric],
                                 "lm_eval": metrics[f"{metric},none"], "n": ours["n"], "lm_eval_task": name,
                                 "slmstack_s": round(ours_s, 1), "lm_eval_s": round(theirs_s, 1)})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=2) + "\n")
    print("| task | metric | slmstack | lm-eval (own task) | equal |\n|---|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['task']} | {r['metric']} | {r['slmstack']:.2f} | {r['lm_eval']:.2f} | "
              f"{'yes' if r['slmstack'] == r['lm_eval'] else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    main()
