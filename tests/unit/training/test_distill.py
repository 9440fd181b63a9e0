from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from slmstack.cli import main
from slmstack.errors import ConfigError, InputError
from slmstack.models import load_model
from slmstack.stack.config import load_stack_config
from slmstack.training.data import Example
from slmstack.training.distill import DistillConfig, distill, find_problem, keep_advice, settle_reply
from slmstack.training.teachers import LocalTeacher, OpenAITeacher, TeacherReply, TeacherUnavailableError
from tests.conftest import stack_dict, write_yaml


class FakeOpenAI:
    """A loopback /v1/chat/completions server: answers 'ANSWER(<last 12 chars of the user turn>)'."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[dict] = []
        self.fail_first = fail_first
        self.down = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.fail_first > 0 or outer.down:
                    outer.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.requests.append(body | {"auth": self.headers.get("Authorization")})
                user = body["messages"][-1]["content"]
                reply = {"choices": [{"message": {"role": "assistant", "content": f"ANSWER({user[-12:]})"},
                                      "finish_reason": "stop"}]}  # fmt: skip
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


EXAMPLES = [Example(id=f"e{i}", instruction=f"instruction number {i}", output=f"reference {i}") for i in range(5)]


def test_distill_against_an_openai_compatible_server(fake: FakeOpenAI, tmp_path: Path, monkeypatch) -> None:
    # Prepare
    monkeypatch.setenv("TEACHER_KEY", "sekret")
    stack = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict("unused-model")))
    teacher = OpenAITeacher(fake.url, "big-teacher", api_key_env="TEACHER_KEY", retries=0)
    # Execute
    report = distill(stack, teacher, EXAMPLES, tmp_path / "d", DistillConfig(batch_size=2), show_progress=False)
    # Assert: each stage's target is the teacher's answer to that stage's prompt, built from earlier targets
    assert report.kept == 5 and report.dropped == {}
    first = [json.loads(line) for line in (tmp_path / "d" / "first.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (tmp_path / "d" / "second.jsonl").read_text().splitlines()]
    third = [json.loads(line) for line in (tmp_path / "d" / "third.jsonl").read_text().splitlines()]
    assert first[0]["prompt"] == "Q: instruction number 0" and first[0]["completion"] == "ANSWER(ion number 0)"
    assert second[0]["prompt"] == "Q: instruction number 0 A: ANSWER(ion number 0)"
    assert third[0]["completion"] == "reference 0" and third[0]["provenance"]["source"] == "reference"
    prov = first[0]["provenance"]
    assert prov["teacher"] == f"openai:big-teacher@{fake.url}" and len(prov["prompt_sha256"]) == 64 and prov["time"]
    # The final stage used the references, so the teacher answered only two stages; the key was sent.
    assert len(fake.requests) == 10 and fake.requests[0]["auth"] == "Bearer sekret"
    assert fake.requests[0]["messages"][0] == {"role": "system", "content": "restate"}
    assert (tmp_path / "d" / "stack.yaml").is_file()


def test_teacher_final_target_and_resume_skips_done_items(fake: FakeOpenAI, tmp_path: Path) -> None:
    stack = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict("m")))
    teacher = OpenAITeacher(fake.url, "t", retries=0)
    cfg = DistillConfig(batch_size=2, final_target="teacher")
    distill(stack, teacher, EXAMPLES[:3], tmp_path / "d", cfg, show_progress=False)
    assert len(fake.requests) == 9
    report = distill(stack, teacher, EXAMPLES, tmp_path / "d", cfg, show_progress=False)
    assert len(fake.requests) == 9 + 6  # only e3 and e4 were asked, 3 stages each
    assert report.kept == 5 and report.resumed == 3


def test_a_journal_line_lacking_a_field_is_named_on_resume(fake: FakeOpenAI, tmp_path: Path) -> None:
    # Prepare: a finished distillation whose journal's first line lost its prompts (a hand edit, another tool)
    stack = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict("m")))
    teacher = OpenAITeacher(fake.url, "t", retries=0)
    distill(stack, teacher, EXAMPLES[:2], tmp_path / "d", DistillConfig(batch_size=2), show_progress=False)
    journal = tmp_path / "d" / "journal.jsonl"
    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    del rows[0]["prompts"]
    journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Execute / Assert: one InputError naming the journal and the fix, not a KeyError
    with pytest.raises(InputError, match=r"journal.jsonl: cannot read the distillation journal .*--overwrite"):
        distill(stack, teacher, EXAMPLES[:2], tmp_path / "d", DistillConfig(batch_size=2), show_progress=False)


def test_unreachable_endpoint_retries_then_fails_keeping_progress(fake: FakeOpenAI, tmp_path: Path) -> None:
    stack = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict("m")))
    teacher = OpenAITeacher(fake.url, "t", retries=2, backoff_s=0.01, workers=1)
    fake.fail_first = 2  # transient: two 503s, then fine
    distill(stack, teacher, EXAMPLES[:2], tmp_path / "d", DistillConfig(batch_size=2), show_progress=False)
    assert len(fake.requests) == 4
    fake.down = True
    with pytest.raises(TeacherUnavailableError, match=r"did not answer after 3 tries.*progress so far is kept"):
        distill(stack, teacher, EXAMPLES, tmp_path / "d", DistillConfig(batch_size=2), show_progress=False)
    journal = (tmp_path / "d" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in journal] == ["e0", "e1"]
    closed = OpenAITeacher("http://127.0.0.1:9/v1", "t", retries=1, backoff_s=0.01)
    with pytest.raises(TeacherUnavailableError, match="did not answer after 2 tries"):
        closed.generate([("r", "m")], stack.stages[0].generation)


def test_distill_with_a_tiny_local_teacher(tiny_model_dir: Path, tmp_path: Path) -> None:
    stack = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, max_new=6)))
    teacher = LocalTeacher(load_model(tiny_model_dir), batch_size=4)
    cfg = DistillConfig(unfinished="keep", final_target="teacher", max_chars=1000)
    report = distill(stack, teacher, EXAMPLES, tmp_path / "d", cfg, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "d" / "third.jsonl").read_text().splitlines()]
    assert report.total == 5 and len(rows) == report.kept
    assert all(r["provenance"]["teacher"] == f"local:{tiny_model_dir}" for r in rows)


def test_another_distillation_in_out_is_refused(fake: FakeOpenAI, tmp_path: Path) -> None:
    stack = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict("m")))
    distill(stack, OpenAITeacher(fake.url, "a", retries=0), EXAMPLES[:1], tmp_path / "d", show_progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        distill(stack, OpenAITeacher(fake.url, "b", retries=0), EXAMPLES[:1], tmp_path / "d", show_progress=False)
    cfg = DistillConfig(overwrite=True)
    assert distill(stack, OpenAITeacher(fake.url, "b", retries=0), EXAMPLES[:1], tmp_path / "d", cfg, False).kept == 1


@pytest.mark.parametrize(
    ("text", "finished", "problem"),
    [
        ("", True, "empty"),
        ("   \n", True, "empty"),
        ("A fine, ordinary answer about the sky being blue because of scattering.", True, None),
        ("a fine answer that was cut", False, None),
        ("x" * 3000, True, "over_long"),
        ("the cat sat " * 10, True, "degenerate"),
        ("Step one.\nRepeat.\nRepeat.\nRepeat.", True, "degenerate"),
        (" ".join(["yes"] * 25), True, "degenerate"),
    ],
)
def test_filters(text: str, finished: bool, problem: str | None) -> None:
    assert find_problem(TeacherReply(text, finished), max_chars=2000) == problem


def test_cut_replies_are_dropped_only_under_the_drop_policy() -> None:
    cut = TeacherReply("a fine answer that was cut", finished=False)
    assert find_problem(cut, max_chars=2000, unfinished="drop") == "unfinished"
    assert find_problem(cut, max_chars=2000, unfinished="keep") is None


@pytest.mark.parametrize(
    ("text", "finished", "policy", "expected"),
    [
        ("Done. All of it.", True, "trim", ("Done. All of it.", "stop")),
        ("First step. Second step is hal", False, "trim", ("First step.", "trimmed")),
        ('He said "go!" and then the', False, "trim", ('He said "go!"', "trimmed")),
        ("1. add 3.5 and 2\n2. then multi", False, "trim", ("1. add 3.5 and 2", "trimmed")),
        ("no sentence end here at al", False, "trim", ("no sentence end here at al", "cut")),
        ("First step. Second step is hal", False, "keep", ("First step. Second step is hal", "cut")),
    ],
)
def test_settle_reply_trims_cut_text_to_the_last_sentence(text, finished, policy, expected) -> None:
    assert settle_reply(TeacherReply(text, finished), policy) == expected


class _CuttingTeacher:
    """Every reply is cut at the token limit after one complete sentence (as a 135M model does)."""

    identity = "cutting"

    def generate(self, requests, settings):
        return [TeacherReply(f"Answer to {len(m)} chars. And then it goes on and o", finished=False)
                for _, m in requests]  # fmt: skip


def test_default_policy_keeps_cut_outputs_trimmed_and_marked(tmp_path: Path) -> None:
    stack = load_stack_config(write_yaml(tmp_path / "s.yaml", stack_dict("m")))
    report = distill(stack, _CuttingTeacher(), EXAMPLES, tmp_path / "d", show_progress=False)
    assert report.kept == len(EXAMPLES) and report.kept_cut["trimmed@first"] == len(EXAMPLES)
    rows = [json.loads(line) for line in (tmp_path / "d" / "second.jsonl").read_text().splitlines()]
    assert all(r["completion"].endswith("chars.") and r["provenance"]["finish"] == "trimmed" for r in rows)
    dropped = distill(stack, _CuttingTeacher(), EXAMPLES, tmp_path / "x", DistillConfig(unfinished="drop"), False)
    assert dropped.kept == 0 and dropped.dropped == {"unfinished@first": len(EXAMPLES)}
    assert "--unfinished trim" in keep_advice(dropped)


def test_cli_distill_then_train(fake: FakeOpenAI, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    # Prepare: GPTeacher-style data with one malformed record
    data = tmp_path / "g.jsonl"
    rows = [json.dumps({"instruction": f"do {i}", "input": "", "response": f"done {i}"}) for i in range(8)]
    data.write_text("\n".join(rows[:4] + ["{broken"] + rows[4:]) + "\n")
    stack = write_yaml(tmp_path / "s.yaml", stack_dict(tiny_model_dir, max_new=4))
    base = ["distill", "--stack", str(stack), "--teacher-url", fake.url, "--teacher-model", "t", "--data", str(data),
            "--out", str(tmp_path / "d")]  # fmt: skip
    # Execute / Assert: malformed line fails with file:line, --skip-bad skips and counts it
    assert main(base) == 2 and "g.jsonl:5: not valid JSON" in capsys.readouterr().err
    assert main([*base, "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] == 8 and summary["skipped_bad_records"] == 1
    train = ["train", "--stack", str(stack), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "t"),
             "--max-steps", "2", "--batch-size", "4", "--stages", "first,third"]  # fmt: skip
    assert main(train) == 0
    assert (tmp_path / "t" / "trained_stack.yaml").is_file()
    assert main(train) == 2 and "--resume" in capsys.readouterr().err
    assert main([*train[:-1], "nope"]) == 2 and "unknown stage 'nope'" in capsys.readouterr().err
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
