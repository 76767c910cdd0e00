"""The `infinitystar` command as a whole: every command group registered, user errors as one line + status 2."""
import pytest

from infinitystar.cli import build_parser, main
from infinitystar.train.config import ConfigError


def test_every_command_group_is_registered():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) >= {"parity", "generate", "eval", "bench", "train", "extract-features", "export",
                                "tokenizer", "convert", "infinity", "demo"}


def test_a_user_error_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INFINITYSTAR_DEBUG", raising=False)
    missing = tmp_path / "missing.yaml"
    assert main(["train", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: no such config file\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, where):
    monkeypatch.delenv("INFINITYSTAR_DEBUG", raising=False)
    argv = ["train", str(tmp_path / "missing.yaml")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ConfigError, match="no such config file"):
        main(argv)


def test_debug_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITYSTAR_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", str(tmp_path / "missing.yaml")])
