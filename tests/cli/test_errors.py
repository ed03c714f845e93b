"""The CLI on bad input: the real `python -m hyperlora` in a subprocess prints ONE line on stderr naming the
problem (no traceback) and exits 2, for eval, train and demo alike (cli/main.py does it once)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GOOD = json.dumps({"policy": "Say 'a' or 'b'.", "examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]})


def _cli(*args: str | bytes, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "hyperlora", *args], capture_output=True, env=env, cwd=cwd,
                          timeout=300)


def _assert_one_line_exit_2(res: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    err = res.stderr.decode("utf-8", "backslashreplace")
    assert res.returncode == 2, (res.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = err.splitlines()
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"hyperlora {command}: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture()
def files(tmp_path):
    bad_regex = tmp_path / "regex.jsonl"
    bad_regex.write_text(GOOD + "\n" + json.dumps({"policy": "p", "examples": [
        {"input": "x", "check": {"regex": "^(a+)+$"}}]}) + "\n")
    bad_utf8 = tmp_path / "utf8.jsonl"
    bad_utf8.write_bytes(GOOD.encode() + b"\n" + b'{"policy": "\xff"}\n')
    dup = tmp_path / "dup.jsonl"
    d = json.loads(GOOD)
    dup.write_text(json.dumps({**d, "id": "x"}) + "\n" + json.dumps({**d, "id": "x"}) + "\n")
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD + "\n")
    bad_cfg = tmp_path / "cfg.json"
    bad_cfg.write_text("{not json")
    return {"regex": bad_regex, "utf8": bad_utf8, "dup": dup, "good": good, "cfg": bad_cfg, "dir": tmp_path}


def _main(capsys, *args: str):
    """The same path in-process (cli/main.py's main), for the many cases (a subprocess costs seconds)."""
    from hyperlora.cli.main import main

    rc = main(list(args))  # anything but the documented input errors propagates and fails the test
    err = capsys.readouterr().err
    return subprocess.CompletedProcess(args, rc, b"", err.encode("utf-8", "backslashreplace"))


def test_real_cli_subprocess_one_line_exit_2(files):
    # one bad input per command through `python -m hyperlora` itself (each start costs a torch import)
    _assert_one_line_exit_2(_cli("eval", "--tasks", str(files["regex"])), "eval", f"{files['regex']}:2",
                            "'^(a+)+$'", "repeated group")
    _assert_one_line_exit_2(_cli("train", "--set", "steps=\"many\""), "train", "steps")
    if os.name == "posix":  # bytes that are not UTF-8 reach sys.argv as lone surrogates
        _assert_one_line_exit_2(_cli("demo", "--policy", b"caf\xe9"), "demo", "--policy 1", "UTF-8")


def test_eval_bad_task_files(files, capsys):
    _assert_one_line_exit_2(_main(capsys, "eval", "--tasks", str(files["utf8"])), "eval", f"{files['utf8']}:2",
                            "not valid UTF-8")
    _assert_one_line_exit_2(_main(capsys, "eval", "--tasks", str(files["dup"])), "eval", f"{files['dup']}:2",
                            f"{files['dup']}:1", "duplicate task id")
    _assert_one_line_exit_2(_main(capsys, "eval", "--tasks", str(files["dir"] / "missing.jsonl")), "eval",
                            "does not exist")
    _assert_one_line_exit_2(_main(capsys, "eval", "--tasks", str(files["dir"])), "eval", "not a regular file")


def test_eval_bad_flag_values(files, capsys):
    _assert_one_line_exit_2(_main(capsys, "eval", "--tasks", str(files["good"]), "--max-policies", "0"), "eval",
                            "max_policies")
    _assert_one_line_exit_2(_main(capsys, "eval", "--splits", "nope"), "eval", "--splits", "nope")


def test_train_bad_config_and_set(files, capsys):
    _assert_one_line_exit_2(_main(capsys, "train", "--config", str(files["dir"] / "none.json")), "train",
                            "does not exist")
    _assert_one_line_exit_2(_main(capsys, "train", "--config", str(files["cfg"])), "train", "not valid JSON")
    _assert_one_line_exit_2(_main(capsys, "train", "--set", "no_such_field=1"), "train", "no_such_field")
    _assert_one_line_exit_2(_main(capsys, "train", "--set", "steps"), "train", "KEY=VALUE")


def test_demo_bad_policies(files, capsys):
    _assert_one_line_exit_2(_main(capsys, "demo", "--policy", "  "), "demo", "--policy 1", "empty")
    _assert_one_line_exit_2(_main(capsys, "demo", "--policy", "ok", "--policy", "caf\udce9"), "demo", "--policy 2")
    _assert_one_line_exit_2(_main(capsys, "demo", "--policies-file", str(files["dir"] / "none.txt")), "demo",
                            "does not exist")
    _assert_one_line_exit_2(_main(capsys, "demo", "--policies-file", str(files["utf8"])), "demo",
                            f"{files['utf8']}:2", "UTF-8")
    _assert_one_line_exit_2(_main(capsys, "demo", "--policies-file", str(files["regex"])), "demo",
                            f"{files['regex']}:2")
    _assert_one_line_exit_2(_main(capsys, "demo", "--hypernet", str(files["dir"] / "none")), "demo", "none")


def test_one_line_joins_multi_line_messages():
    from hyperlora.cli.main import one_line

    assert one_line(ValueError("first\n  second\n")) == "first; second"
    assert one_line(FileNotFoundError()) == "FileNotFoundError"


def test_serve_refuses_a_calibration_without_the_budgets_threshold(tmp_path, capsys):
    """A calibrator fit for budget 0.1 cannot silently serve --budget 0.2 (it would never escalate): refused at
    start, naming the budgets the file has; a file that has it passes this check (and then fails on the port)."""
    from hyperlora.decisions.calibration import Calibrator

    path = Calibrator("temperature", {"*": {"t": 2.0}}, thresholds={"budget": {"0.1": 0.8}}).save(tmp_path / "c.json")
    _assert_one_line_exit_2(_main(capsys, "serve", "--calibration", str(path), "--budget", "0.2"), "serve",
                            "--budget 0.2", "0.1")
    _assert_one_line_exit_2(_main(capsys, "serve", "--calibration", str(path), "--budget", "0.1", "--port", "-1"),
                            "serve", "--port -1")


def test_serve_refuses_max_adapters_per_step_below_one(capsys):
    _assert_one_line_exit_2(_main(capsys, "serve", "--max-adapters-per-step", "0"), "serve",
                            "--max-adapters-per-step must be >= 1")
