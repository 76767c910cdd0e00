"""The official InfinityStar fixtures reproduced through the code users run (`infinitystar parity`)."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from infinitystar.cli import main as cli_main
from infinitystar.parity import FixtureError, run_checks


@pytest.mark.parametrize("kind", ["schedules", "quantizer", "transformer", "apg"])
def test_fixture_passes(fixtures_dir, kind):
    records = list(run_checks(fixtures_dir / "infinitystar" / kind))
    assert len(records) > 10
    bad = [r for r in records if not r.ok]
    assert not bad, bad[:5]
    # the float tensors are reproduced far inside the 1e-4 tolerance
    assert max((r.max_abs_err for r in records if r.tol > 0), default=0.0) < 1e-5


def test_cli_prints_json_lines_and_exit_status(fixtures_dir, capsys):
    assert cli_main(["parity", str(fixtures_dir / "infinitystar" / "apg")]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert lines and all({"tensor", "max_abs_err", "tol"} <= set(l) for l in lines)


def test_exceeding_tolerance_exits_1(fixtures_dir, tmp_path, capsys):
    folder = tmp_path / "apg"
    shutil.copytree(fixtures_dir / "infinitystar" / "apg", folder)
    t = load_file(str(folder / "io.safetensors"))
    t["case00/plain_cfg3"] = t["case00/plain_cfg3"] + 1e-3
    save_file(t, str(folder / "io.safetensors"))
    assert cli_main(["parity", str(folder)]) == 1
    out = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["tensor"] for r in out if r["max_abs_err"] > r["tol"]] == ["case00/plain_cfg3"]


def test_missing_tensor_is_a_clear_error(fixtures_dir, tmp_path, capsys):
    folder = tmp_path / "quantizer"
    shutil.copytree(fixtures_dir / "infinitystar" / "quantizer", folder)
    t = load_file(str(folder / "io.safetensors"))
    del t["nobsc/step003/X"]
    save_file(t, str(folder / "io.safetensors"))
    assert cli_main(["parity", str(folder)]) == 2
    err = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert "nobsc/step003/X" in err


def test_malformed_folders(tmp_path, capsys):
    assert cli_main(["parity", str(tmp_path / "nope")]) == 2
    (tmp_path / "config.json").write_text(json.dumps({"kind": "infinitystar/unknown"}))
    assert cli_main(["parity", str(tmp_path)]) == 2
    assert "not supported" in capsys.readouterr().out
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FixtureError):
        list(run_checks(tmp_path))
