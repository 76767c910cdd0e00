"""The `infinitystar` command as a whole: every command group registered, user errors as one line + status 2."""
import json

import pytest

from infinitystar.cli import build_parser, main
from infinitystar.train.config import ConfigError


def test_every_command_group_is_registered():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) >= {"parity", "generate", "eval", "bench", "train", "extract-features", "export", "grow",
                                "average", "tokenizer", "convert", "infinity", "demo"}


def test_a_user_error_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INFINITYSTAR_DEBUG", raising=False)
    missing = tmp_path / "missing.yaml"
    assert main(["train", "generator", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: no such config file\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, where):
    monkeypatch.delenv("INFINITYSTAR_DEBUG", raising=False)
    argv = ["train", "generator", str(tmp_path / "missing.yaml")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ConfigError, match="no such config file"):
        main(argv)


def test_debug_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITYSTAR_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "generator", str(tmp_path / "missing.yaml")])


def test_old_spellings_are_aliases_with_a_deprecation_note(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INFINITYSTAR_DEBUG", raising=False)
    missing = str(tmp_path / "missing.yaml")
    for argv, new in ((["train", missing], f"infinitystar train generator {missing}"),
                      (["infinity", "train", missing], f"infinitystar train infinity {missing}"),
                      (["infinity", "train-tokenizer", missing], f"infinitystar train infinity-tokenizer {missing}"),
                      (["tokenizer", "train", "bitwise", "--config", missing],
                       f"infinitystar train tokenizer {missing} --set mode=bitwise")):
        assert main(argv) == 2
        note, error = capsys.readouterr().err.splitlines()
        assert note.startswith("note: `") and "is deprecated" in note and f"use `{new}`" in note
        assert error == f"error: {missing}: no such config file"


def test_unknown_kind_and_missing_config(capsys):
    assert main(["train", "vae", "c.yaml"]) == 2
    assert "unknown training kind 'vae'; choose one of generator, tokenizer, infinity, infinity-tokenizer" in \
        capsys.readouterr().err
    assert main(["train", "tokenizer"]) == 2
    assert "give the run's config file: infinitystar train tokenizer CONFIG" in capsys.readouterr().err


@pytest.mark.slow   # one long video from the built-in model
def test_eval_shapes_prints_accuracies_and_the_long_segments(tmp_path, capsys):
    assert main(["eval", "shapes", "--n", "1", "--tasks", "long", "--seed", "3", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert set(json.loads(out[0])["long"]) == {"overall", "seen", "heldout"}
    saved = json.loads((tmp_path / "results.json").read_text())["by_task"]["long"]["segments"]
    lines = [line for line in out if line.startswith("long, ")]
    assert len(lines) == len(saved) and sum(g["n"] for g in saved.values()) == 2


def test_eval_shapes_samples_every_prompt_several_times(tmp_path, capsys):
    argv = ["eval", "shapes", "--n", "2", "--tasks", "t2i", "--samples-per-prompt", "2", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["samples_per_prompt"] == 2 and len(saved["by_task"]["t2i"]["all_correct_per_round"]) == 2
    assert any(line.startswith("t2i: all-correct per sampling round") for line in capsys.readouterr().out.splitlines())
    assert main(["eval", "shapes", "--samples-per-prompt", "0"]) == 2
