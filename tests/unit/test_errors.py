"""One exception root: every error rlq raises on purpose is an RlqError, the CLI prints those (and only those, plus
config validation and Redis refusals) as one line with exit code 2, and anything else keeps its traceback."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.exceptions

from broker.errors import RlqError, UserError
from rlq.errors import USAGE_EXIT_CODE, run_cli

REPO = Path(__file__).resolve().parents[2]

# (module, class name, the base existing `except` clauses rely on)
CLASSES = [
    ("broker.errors", "UserError", RuntimeError),
    ("broker.errors", "WeightSyncError", RuntimeError),
    ("broker.errors", "EngineStateLost", RuntimeError),
    ("broker.schemas", "MessageError", ValueError),
    ("broker.connection", "BrokerUnreachable", redis.exceptions.ConnectionError),  # redis-py's, not the builtin
    ("broker.server", "RedisServerError", RuntimeError),
    ("workers.generate.weights", "WeightSyncError", RuntimeError),
    ("workers.generate.weights", "EngineStateLost", RuntimeError),
    ("workers.generate.vllm_reload", "ModelLeftMixed", RuntimeError),
    ("learner.broadcast", "WeightSyncError", RuntimeError),
    ("rlq.errors", "UserError", RuntimeError),
    ("rlq.supervisor", "RoleFailed", RuntimeError),
    ("rlq.data_dapo", "SkipRow", ValueError),
    ("rlq.overrides", "ConfigError", ValueError),
]


@pytest.mark.parametrize(("module", "name", "builtin"), CLASSES, ids=[f"{m}.{n}" for m, n, _ in CLASSES])
def test_every_error_class_derives_from_the_root_and_keeps_its_old_base(module, name, builtin) -> None:
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, RlqError)
    assert issubclass(cls, builtin)


def test_shared_classes_are_defined_once() -> None:
    import broker.errors
    import learner.broadcast
    import rlq.errors
    import workers.generate.weights

    assert (
        learner.broadcast.WeightSyncError is workers.generate.weights.WeightSyncError is broker.errors.WeightSyncError
    )
    assert workers.generate.weights.EngineStateLost is broker.errors.EngineStateLost
    assert rlq.errors.UserError is broker.errors.UserError


def test_the_root_imports_nothing_outside_the_standard_library() -> None:
    code = "import sys; import broker.errors; print(sorted(m for m in ('torch', 'numpy', 'redis', 'pydantic', "
    code += "'msgspec') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def _run_cli_of(exc: BaseException, capsys, monkeypatch) -> tuple[int, list[str]]:
    monkeypatch.delenv("RLQ_DEBUG", raising=False)

    def entry() -> None:
        raise exc

    with pytest.raises(SystemExit) as info:
        run_cli(entry)
    return info.value.code, capsys.readouterr().err.splitlines()


def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch) -> None:
    code, lines = _run_cli_of(UserError("no such thing: /x (make one)"), capsys, monkeypatch)
    assert code == USAGE_EXIT_CODE == 2
    assert lines == ["rlq: no such thing: /x (make one)"]


def test_a_config_that_does_not_validate_is_one_line_and_exit_2(capsys, monkeypatch) -> None:
    import pydantic

    from rlq.config import RunConfig

    with pytest.raises(pydantic.ValidationError) as info:
        RunConfig.model_validate({"grpo": {"max_num_steps": "many"}})
    code, lines = _run_cli_of(info.value, capsys, monkeypatch)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("rlq: invalid config: "), lines


def test_a_malformed_message_is_one_line_and_exit_2(capsys, monkeypatch) -> None:
    from broker.schemas import MessageError, PromptBatch, decode

    with pytest.raises(MessageError) as info:
        decode(b"\xc1 not msgpack", PromptBatch)
    code, lines = _run_cli_of(info.value, capsys, monkeypatch)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("rlq: "), lines


def test_a_plain_file_not_found_error_is_a_bug_and_keeps_its_traceback(monkeypatch) -> None:
    monkeypatch.delenv("RLQ_DEBUG", raising=False)

    def entry() -> None:
        open("/no/such/file/anywhere")  # noqa: SIM115 - raises before there is anything to close

    with pytest.raises(FileNotFoundError):
        run_cli(entry)
    with pytest.raises(PermissionError):
        run_cli(lambda: (_ for _ in ()).throw(PermissionError("internal")))


def test_rlq_debug_shows_the_traceback_of_a_user_error(monkeypatch) -> None:
    monkeypatch.setenv("RLQ_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli(lambda: (_ for _ in ()).throw(UserError("shown with its traceback")))


def test_rlq_train_with_a_missing_config_is_one_line_and_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RLQ_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "rlq", "train", "--config", "/no/such.yaml"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlq: "), proc.stderr
    assert "/no/such.yaml" in lines[0] and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- files the user names: UserError, not a builtin


def _data_config(path: Path, validation: Path | None = None):
    from learner.config import DataConfig

    return DataConfig(path=path, validation_path=validation)


def test_missing_training_and_validation_data_are_user_errors(tmp_path: Path) -> None:
    from broker.prepared import read_rows
    from learner.data_source import training_file, validation_file

    with pytest.raises(UserError, match=r"no training data at .*train\.jsonl: point data.path"):
        training_file(_data_config(tmp_path))
    with pytest.raises(UserError, match="no training data at .*nope.jsonl"):
        training_file(_data_config(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="prepared data not found: .*nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="no validation file at .*validation.jsonl"):
        validation_file(_data_config(tmp_path))
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(UserError, match="data.path .* is a file, so set data.validation_path"):
        validation_file(_data_config(tmp_path / "train.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\xfa\n")
    with pytest.raises(UserError, match=r"cannot read .*binary\.jsonl"):
        read_rows(tmp_path / "binary.jsonl")


def test_a_latest_pointer_to_an_incomplete_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    from broker.policy import latest_checkpoint

    (tmp_path / "step_3").mkdir()
    (tmp_path / "latest").write_text("step_3")
    with pytest.raises(UserError, match="not a complete checkpoint: point it at a complete step_<N>"):
        latest_checkpoint(tmp_path)


def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    from rlq.overrides import ConfigError, load_yaml

    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ConfigError, match="cannot read config file .*binary.yaml"):
        load_yaml(tmp_path / "binary.yaml")


def test_an_output_dir_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    from rlq.data import ArithConfig, prepare_arith
    from rlq.tiny_policy import build_base_model

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create output directory .*a-file.*choose another --output-dir"):
        prepare_arith(blocker / "out", ArithConfig(n_train=4, n_val=1))
    with pytest.raises(UserError, match="a-file exists and is not a directory; choose another --output-dir"):
        build_base_model(blocker)


def test_rlq_train_with_a_missing_data_path_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    from rlq.config import load_run_config
    from rlq.launch import train

    cfg = load_run_config(REPO / "configs" / "tiny_arith_cpu.yaml",
                          [f"data.path={tmp_path / 'no-data'}", f"logger.log_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(UserError, match="no training data at .*no-data"):
        train(cfg)
    assert not (tmp_path / "run" / "redis").exists() and not (tmp_path / "run" / "logs").exists()


def test_rlq_train_with_a_run_dir_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    from rlq.config import load_run_config
    from rlq.launch import train

    (tmp_path / "a-file").write_text("")
    cfg = load_run_config(REPO / "configs" / "tiny_arith_cpu.yaml", [f"logger.log_dir={tmp_path / 'a-file' / 'run'}"])
    with pytest.raises(UserError, match="cannot write the run directory .*set logger.log_dir to a writable place"):
        train(cfg)


def test_prepare_data_into_a_file_is_one_line_from_the_cli(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "RLQ_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlq", "prepare-data", "--source", "arith", "--n-train", "4", "--n-val", "1",
         "--output-dir", str(tmp_path / "a-file")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"rlq: cannot create output directory {tmp_path / 'a-file'} (File exists): choose another --output-dir"
    ]
    assert proc.stdout == ""
