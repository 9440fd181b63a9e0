"""LEGO recombination experiment: federated LoRA of pruned blocks vs FedAvg, HeteroFL, local-only, centralised.

Setup (issue #9): the default model; 4 clients holding Wanda blocks at sparsity 0 / 0.25 / 0.5 / 0.75;
T0 multi-task data, a held-out set, and a Dirichlet(alpha) split over the T0 categories (the same
partitions for every arm of a seed). Arms:

- ``fedavg``: FedAvg of the LoRA factors with 4 *dense* clients (the homogeneous reference);
- ``heterofl``, ``lego-svd``, ``lego-factors``: the pruned blocks, each strategy;
- ``local``: each block trains alone on its partition for rounds x steps;
- ``central``: the dense model trained on the union for the same total steps (the upper bound).

Reported per arm and seed: the held-out loss of the recombined model (dense base + global adapter),
each block's loss on the held-out records of its own categories and of the others (its block with the
global adapter masked to it; for ``local``, its own adapter), bytes per round relative to one
full-weight FedAvg update, and wall time.

    python benchmarks/federated_lego.py --data-dir ../shared/data --seeds 0,1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPARSITIES = [0.0, 0.25, 0.5, 0.75]
ARMS = ["fedavg", "heterofl", "lego-svd", "lego-factors", "local", "central"]


def make_blocks(data_dir: Path, work: Path, nsamples: int, seqlen: int) -> dict[float, str]:
    """Wanda blocks of the default model (``slmstack prune``), made once and reused."""
    out = work / "blocks"
    blocks = {s: str(out / f"wanda-{round(s * 100)}") for s in SPARSITIES if s > 0}
    if not all((Path(b) / "masks.safetensors").is_file() for b in blocks.values()):
        calib = data_dir / "wikitext2" / "tokenized" / "valid.txt"
        cmd = [str(Path(sys.executable).parent / "slmstack"), "prune", "--model", "default", "--method", "wanda",
               "--sparsity", *[str(s) for s in blocks], "--calibration", str(calib), "--nsamples", str(nsamples),
               "--seqlen", str(seqlen), "--out", str(out), "--overwrite"]  # fmt: skip
        subprocess.run(cmd, check=True)
    return blocks


def fed_config(arm: str, args: argparse.Namespace, seed: int, blocks: dict[float, str]) -> dict[str, Any]:
    dense = arm == "fedavg"
    clients = [{"sparsity": 0.0} if dense or s == 0 else {"block": blocks[s]} for s in SPARSITIES]
    strategy, _, rank_return = arm.partition("-")
    return {"model": "default", "rounds": args.rounds, "strategy": strategy, "rank_return": rank_return or "svd",
            "clients": clients, "min_clients": 1, "seed": seed,
            "data": {"path": str(args.data_dir / "t0_multitask"), "limit": args.limit, "partition": "dirichlet",
                     "column": "category", "alpha": args.alpha, "eval_fraction": args.eval_fraction},
            "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "rank": 8, "alpha": 16,
                      "max_length": args.max_length}}  # fmt: skip


def run_federated(arm: str, cfg: dict, out: Path) -> dict[str, Any]:
    from slmstack.config import build_dataclass
    from slmstack.federated.config import FederateConfig
    from slmstack.federated.run import federate

    start = time.perf_counter()
    metrics = federate(build_dataclass(FederateConfig, cfg), out, resume=(out / "plan.json").is_file())
    last = metrics["rounds"][-1]
    return {"arm": arm, "eval_loss": last["eval_loss"], "curve": [r["eval_loss"] for r in metrics["rounds"]],
            "own_other": last.get("client_eval_own_other", {}),
            "bytes_ratio": last["bytes_up"] / len(cfg["clients"]) / metrics["full_model_bytes"],
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def run_alone(arm: str, cfg: dict, plan_dir: Path) -> dict[str, Any]:
    """``local``: each block alone on its partition; ``central``: the dense model on the union."""
    import torch
    from peft import get_peft_model

    from slmstack.federated.lora import masked_merge
    from slmstack.federated.plan import load_plan
    from slmstack.models import load_model
    from slmstack.pruning.masks import load_masks
    from slmstack.training.train_data import tokenize_example
    from slmstack.training.trainer import eval_loss, train_lora_steps

    plan = load_plan(plan_dir)
    t = plan.train
    total_steps = plan.rounds * t["steps"]
    start = time.perf_counter()

    def tokenize(tok: Any, records: list[dict]) -> list:
        return [tokenize_example(tok, "", r["prompt"], r["completion"], t["max_length"], True) for r in records]

    heldout = plan.heldout()
    if arm == "central":
        lm = load_model(plan.model, device="cpu", dtype="float32")
        torch.manual_seed(plan.seed)
        model = get_peft_model(lm.model, plan.lora_config(lm.model))
        union = [r for i in range(len(plan.clients)) for r in plan.partition(i)]
        train_lora_steps(model, lm.tokenizer.pad_token_id, tokenize(lm.tokenizer, union),
                         total_steps * len(plan.clients), t["batch_size"], t["lr"], seed=plan.seed)  # fmt: skip
        loss = eval_loss(model, tokenize(lm.tokenizer, heldout), lm.tokenizer.pad_token_id, t["batch_size"])
        return {"arm": arm, "eval_loss": loss, "own_other": {}, "bytes_ratio": None,
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    own_other, losses = {}, []
    for i, spec in enumerate(plan.clients):
        lm = load_model(spec["model"], device="cpu", dtype="float32")
        torch.manual_seed(plan.seed + i)
        model = get_peft_model(lm.model, plan.lora_config(lm.model))
        mine = plan.partition(i)
        train_lora_steps(model, lm.tokenizer.pad_token_id, tokenize(lm.tokenizer, mine), total_steps,
                         t["batch_size"], t["lr"], seed=plan.seed + i)  # fmt: skip
        labels = {r["category"] for r in mine}
        masks = load_masks(Path(spec["masks"])) if spec.get("masks") else None
        pad = lm.tokenizer.pad_token_id
        row = {}
        with masked_merge(model, masks) as merged:
            for name, subset in (("own", [r for r in heldout if r["category"] in labels]),
                                 ("other", [r for r in heldout if r["category"] not in labels]),
                                 ("all", heldout)):  # fmt: skip
                if subset:
                    row[name] = eval_loss(merged, tokenize(lm.tokenizer, subset), pad, t["batch_size"])
        losses.append(row["all"])
        own_other[str(i)] = {k: v for k, v in row.items() if k != "all"}
    note = "mean over blocks, each with its own adapter"
    return {"arm": arm, "eval_loss": statistics.mean(losses), "own_other": own_other, "bytes_ratio": 0.0,
            "seconds": round(time.perf_counter() - start, 1), "note": note}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "fedexp")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--limit", type=int, default=320)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--eval-fraction", type=float, default=0.125)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--out", type=Path, default=HERE / "results" / "federated_lego.json")
    p.add_argument("--png", type=Path, default=HERE.parent / "docs" / "federated_lego.png")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot from --out")
    args = p.parse_args()
    if args.report:
        results = json.loads(args.out.read_text())["runs"]
        print_table(results)
        plot(results, args.png)
        return

    blocks = make_blocks(args.data_dir, args.work, args.nsamples, args.seqlen)
    results = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    done = {(r["arm"], r["seed"]) for r in results}
    for seed in map(int, args.seeds.split(",")):
        for arm in args.arms.split(","):
            if (arm, seed) in done:
                continue
            out = args.work / f"seed{seed}" / arm
            if arm in ("local", "central"):
                plan_dir = args.work / f"seed{seed}" / "heterofl"  # the same blocks and partitions
                row = run_alone(arm, fed_config("heterofl", args, seed, blocks), plan_dir)
            else:
                row = run_federated(arm, fed_config(arm, args, seed, blocks), out)
            results.append({**row, "seed": seed})
            print(json.dumps(results[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                            "runs": results}, indent=2) + "\n")  # fmt: skip
    print_table(results)
    plot(results, args.png)


def plot(results: list[dict], png: Path) -> None:
    """Held-out loss of the recombined model against round: one colour per arm, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colours = dict(zip(ARMS, ["C0", "C1", "C2", "C3", "grey", "black"], strict=True))
    for r in results:
        style = ["-", "--", ":"][r["seed"] % 3]
        if "curve" in r:
            ax.plot(range(len(r["curve"])), r["curve"], style, marker="o", ms=3, color=colours[r["arm"]],
                    label=f"{r['arm']} seed {r['seed']}")  # fmt: skip
        else:
            ax.axhline(r["eval_loss"], ls=style, lw=1, color=colours[r["arm"]], label=f"{r['arm']} seed {r['seed']}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.set_title("recombined model (the held-out set differs per seed)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_table(results: list[dict]) -> None:
    seeds = sorted({r["seed"] for r in results})
    head = " | ".join(f"seed {k}" for k in seeds)
    print(f"| arm | held-out loss: {head} | own categories | other categories | bytes/round vs full | seconds |")
    print("|---|" + "---:|" * (len(seeds) + 4))
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        by_seed = {r["seed"]: f"{r['eval_loss']:.4f}" for r in rows}
        own = [v["own"] for r in rows for v in r["own_other"].values() if "own" in v]
        other = [v["other"] for r in rows for v in r["own_other"].values() if "other" in v]
        ratio = "—" if rows[0]["bytes_ratio"] is None else f"{rows[0]['bytes_ratio']:.4f}"
        own_mean = f"{statistics.mean(own):.4f}" if own else "—"
        other_mean = f"{statistics.mean(other):.4f}" if other else "—"
        seconds = statistics.mean(r["seconds"] for r in rows)
        cells = " | ".join(by_seed.get(k, "—") for k in seeds)
        print(f"| {arm} | {cells} | {own_mean} | {other_mean} | {ratio} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
