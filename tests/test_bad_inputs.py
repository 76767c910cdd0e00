"""Bad inputs a hostile but fair user tries, one table. Every case runs the `infinitystar` command in this process
and asserts: exit status 2, the error is one line `error: ...` on stderr that names the problem (the last line, no
traceback; a note such as "resumed from ..." may come before it), and no file was created, changed or removed
(outputs, checkpoints, the inputs themselves).

Cases needing a model use a copy of the shipped default model (damaged as the case says); training cases use a
tiny run with a built-in text encoder and a latent cache, trained once for the module.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import yaml

from infinitystar.cli import main
from infinitystar.pipelines.infinitystar import DEFAULT_MODEL_DIR
from infinitystar.train.checkpoint import write_manifest
from test_train import SRC, LinearTokenizer, builtin_text_encoder, tiny_config, write_dataset

PROMPT = "a large red circle moving right quickly on a black background"


# --------------------------------------------------------------------------------------------------
# Shared worlds: a copy of the default model, a finished tiny training run
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from infinitystar.train.config import config_from_dict
    from infinitystar.train.features import extract_features
    from infinitystar.train.trainer import Trainer, spec_from_config
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(DEFAULT_MODEL_DIR, root / "model")
    manifest = write_dataset(root / "data", n_videos=2, n_images=2)
    raw = tiny_config(root / "run", manifest, train={"max_steps": 2}, checkpoint={"every": 2},
                      data={"latent_cache": str(root / "cache"), "require_cache": True},
                      text_encoder={"path": str(builtin_text_encoder(root / "te"))})
    extract_features(manifest, LinearTokenizer(), root / "cache", spec=spec_from_config(config_from_dict(raw)),
                     progress=False)
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    tr = Trainer(config_from_dict(raw))
    try:
        tr.fit()
    finally:
        tr.close()
    return root


@dataclass
class Ctx:
    tmp: Path
    world: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list = field(default_factory=list)

    def model(self, damage: Optional[Callable[[Path], None]] = None) -> Path:
        """A model folder: the shared copy, or a private copy damaged by `damage`."""
        if damage is None:
            return self.world / "model"
        d = self.tmp / "model"
        shutil.copytree(self.world / "model", d)
        damage(d)
        return d

    def config(self, **changes) -> Path:
        """The tiny run's config with `changes` (section -> dict, or key -> value), output into this case's tmp."""
        raw = yaml.safe_load((self.world / "run.yaml").read_text())
        raw["output_dir"] = str(self.tmp / "run")
        for k, v in changes.items():
            raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
        path = self.tmp / "run.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def run_copy(self) -> Path:
        """A private copy of the finished run (to damage), its config.yaml as a run in this folder writes it."""
        from infinitystar.train.config import load_config
        shutil.copytree(self.world / "run", self.tmp / "run")
        (self.tmp / "run" / "config.yaml").write_text(load_config(self.config()).to_yaml())
        return self.tmp / "run"


def gen(c: Ctx, *extra, out: Optional[str] = None) -> list:
    """`generate` with one prompt (--json: no progress bar on stderr, only the error line)."""
    return ["generate", "--prompt", PROMPT, "--out", out or str(c.tmp / "v.mp4"), "--json", *extra]


def recon(c: Ctx, *extra, out: Optional[Path] = None) -> list:
    """`tokenizer reconstruct` of a valid 17-frame clip."""
    import numpy as np
    clip = c.tmp / "in.npy"
    np.save(clip, np.random.default_rng(0).integers(0, 256, (17, 64, 64, 3), dtype=np.uint8))
    return ["tokenizer", "reconstruct", clip, out or c.tmp / "out.mp4", *extra]


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def bomb_png(path: Path, side: int = 40000) -> Path:
    """A tiny PNG file whose header claims side x side pixels (1-bit gray): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def put_nan(weights: Path) -> None:
    """A NaN in the first weight of a .safetensors file."""
    from safetensors.torch import load_file, save_file
    state = load_file(weights)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key].view(-1)[0] = float("nan")
    save_file(state, weights)


def nan_weight(component: str) -> Callable[[Path], None]:
    """Damage for `Ctx.model`: a NaN in `component`'s weights."""
    return lambda d: put_nan(d / component / "model.safetensors")


def full_disk(c: Ctx) -> list:
    """The disk fills up while the video is written: the existing file at --out must survive."""
    out = c.tmp / "v.mp4"
    out.write_bytes(b"an earlier video")

    def enospc(*a, **k):
        raise OSError(28, "No space left on device")
    c.monkeypatch.setattr("av.open", enospc)
    return gen(c, "--seed", "1", out=str(out))


def hold_lock(c: Ctx, directory: Path) -> int:
    """Another process holding the run lock of `directory`; killed after the case."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = ("import sys, time; from infinitystar.train.lock import lock_run; "
            "lock = lock_run(sys.argv[1]); print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    c.cleanups.append(lambda: (proc.send_signal(signal.SIGKILL), proc.wait()))
    return proc.pid


def planted_pickle(c: Ctx) -> list:
    run = c.run_copy()
    ckpt = run / "checkpoints" / "step_00000002"
    (ckpt / "optimizer" / "rank_00000.safetensors").write_bytes(
        pickle.dumps(Marker(c.tmp / "payload-ran")))
    write_manifest(ckpt)   # a forged manifest: the checksums match, the reader must still refuse the file
    c.cleanups.append(lambda: not (c.tmp / "payload-ran").exists() or pytest.fail("the planted pickle ran"))
    return ["train", "generator", c.config(), "--resume", ckpt]


class Marker:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def has_device(kind: str) -> bool:
    from infinitystar.runtime import available_devices
    return any(d.startswith(kind) for d in available_devices())


def no_sys() -> Optional[str]:
    import tempfile
    try:
        fd, p = tempfile.mkstemp(dir="/sys")
    except OSError:
        return None
    os.close(fd)
    os.unlink(p)
    return "/sys is writable here"


# (id, argv builder, regex the one-line message must match, reason to skip or None)
CASES: list[tuple[str, Callable[[Ctx], list], str, Callable[[], Optional[str]]]] = [
    # --- generate: the output ---------------------------------------------------------------------------------
    ("generate --out an existing folder", lambda c: gen(c, out=str(c.tmp)), r"is a folder", None),
    ("generate --out unknown extension", lambda c: gen(c, out=str(c.tmp / "v.mkv")), r"v\.mkv", None),
    ("generate --out in a missing folder", lambda c: gen(c, out=str(c.tmp / "nope" / "v.mp4")),
     r"nope.* does not exist", None),
    ("generate --out unwritable folder", lambda c: gen(c, out="/sys/v.mp4"), r"/sys.* not writable", no_sys),
    ("generate --out on a full disk", full_disk, r"v\.mp4: cannot write \(No space left on device\)", None),
    # --- generate: options -----------------------------------------------------------------------------------
    ("generate --device cuda without CUDA", lambda c: gen(c, "--device", "cuda"), r"'cuda'.*available here: cpu",
     lambda: "CUDA is available" if has_device("cuda") else None),
    ("generate --device mps without MPS", lambda c: gen(c, "--device", "mps"), r"'mps'.*available here",
     lambda: "MPS is available" if has_device("mps") else None),
    ("generate --device bogus", lambda c: gen(c, "--device", "bogus"), r"'bogus'", None),
    ("generate --seed above 2**64", lambda c: gen(c, "--seed", str(2 ** 64)), r"--seed.*18446744073709551616",
     None),
    ("generate --seed negative", lambda c: gen(c, "--seed", "-1"), r"--seed.*-1", None),
    ("generate --cfg nan", lambda c: gen(c, "--cfg", "nan"), r"--cfg.*'nan' is not a finite number", None),
    ("generate --tau nan", lambda c: gen(c, "--tau", "nan"), r"--tau.*'nan' is not a finite number", None),
    ("generate --tau inf", lambda c: gen(c, "--tau", "inf"), r"--tau.*'inf'", None),
    ("generate --image decompression bomb", lambda c: gen(c, "--image", bomb_png(c.tmp / "bomb.png")),
     r"bomb\.png.*decompression bomb", None),
    ("generate --prompts-file beyond the clips",
     lambda c: ((c.tmp / "p.txt").write_text(f"{PROMPT}\n{PROMPT}\n{PROMPT}\n"),
                ["generate", "--prompts-file", c.tmp / "p.txt", "--frames", "17", "--out", c.tmp / "v.mp4",
                 "--json"])[1],
     r"3 prompts.*1 clip", None),
    ("generate --prompts-file invalid UTF-8",
     lambda c: ((c.tmp / "p.txt").write_bytes(b"a red \xff circle\n"),
                ["generate", "--prompts-file", c.tmp / "p.txt", "--out", c.tmp / "v.mp4", "--json"])[1],
     r"p\.txt.*UTF-8", None),
    ("generate --strict-prompt with a long prompt",
     lambda c: ["generate", "--prompt", " ".join([PROMPT] * 4), "--strict-prompt", "--out", c.tmp / "v.mp4",
                "--json"],
     r"words.*cut", None),
    # --- generate: the model folder --------------------------------------------------------------------------
    ("generate model folder without transformer weights",
     lambda c: gen(c, "--model", c.model(lambda d: (d / "transformer" / "model.safetensors").unlink())),
     r"transformer.*model\.safetensors", None),
    ("generate NaN transformer weights", lambda c: gen(c, "--model", c.model(nan_weight("transformer"))),
     r"transformer/model\.safetensors.*nan", None),
    ("generate NaN tokenizer weights", lambda c: gen(c, "--model", c.model(nan_weight("tokenizer"))),
     r"tokenizer/model\.safetensors.*nan", None),
    ("generate NaN text encoder weights", lambda c: gen(c, "--model", c.model(nan_weight("text_encoder"))),
     r"text_encoder/model\.safetensors.*nan", None),
    ("generate model_index.json without height",
     lambda c: gen(c, "--model", c.model(lambda d: edit_json(d / "model_index.json", lambda j: j.pop("height")))),
     r"model_index\.json.*'height'", None),
    ("generate model_index.json height a string",
     lambda c: gen(c, "--model", c.model(
         lambda d: edit_json(d / "model_index.json", lambda j: j.update(height="tall")))),
     r"model_index\.json.*'height'.*tall", None),
    ("generate model_index.json fps a string",
     lambda c: gen(c, "--model", c.model(
         lambda d: edit_json(d / "model_index.json", lambda j: j["defaults"].update(fps="fast")))),
     r"model_index\.json.*fps.*fast", None),
    ("generate model_index.json not JSON",
     lambda c: gen(c, "--model", c.model(lambda d: (d / "model_index.json").write_text("{family"))),
     r"model_index\.json", None),
    ("generate model_index.json a list",
     lambda c: gen(c, "--model", c.model(lambda d: (d / "model_index.json").write_text("[]"))),
     r"model_index\.json.*list", None),
    *[(f"generate {part}/config.json {what}",
       (lambda part, damage: lambda c: gen(c, "--model", c.model(lambda d: damage(d / part / "config.json"))))(
           part, damage), rf"{part}/config\.json{hint}", None)
      for part in ("transformer", "tokenizer", "text_encoder")
      for what, damage, hint in (
          ("not JSON", lambda f: f.write_text("{width"), ""),
          ("a wrong type", lambda f: edit_json(f, lambda j: j.update(width="wide") if "width" in j
                                               else j.update(in_channels="wide")), r".*wide"))],
    # --- tokenizer reconstruct -------------------------------------------------------------------------------
    ("reconstruct model folder without weights",
     lambda c: recon(c, "--model", c.model(lambda d: (d / "tokenizer" / "model.safetensors").unlink()) / "tokenizer"),
     r"tokenizer.*model\.safetensors", None),
    ("reconstruct model folder config.json not JSON",
     lambda c: recon(c, "--model", c.model(lambda d: (d / "tokenizer" / "config.json").write_text("{")) / "tokenizer"),
     r"tokenizer/config\.json", None),
    ("reconstruct NaN tokenizer weights",
     lambda c: recon(c, "--model", c.model(nan_weight("tokenizer")) / "tokenizer"),
     r"tokenizer/model\.safetensors.*nan", None),
    ("reconstruct --device bogus", lambda c: recon(c, "--device", "bogus"), r"'bogus'", None),
    ("reconstruct --device cuda without CUDA", lambda c: recon(c, "--device", "cuda"), r"'cuda'.*available here",
     lambda: "CUDA is available" if has_device("cuda") else None),
    ("reconstruct --device mps without MPS", lambda c: recon(c, "--device", "mps"), r"'mps'.*available here",
     lambda: "MPS is available" if has_device("mps") else None),
    ("reconstruct --fps -3", lambda c: recon(c, "--fps", "-3"), r"--fps.*-3", None),
    ("reconstruct output an existing folder", lambda c: recon(c, out=c.tmp), r"is a folder", None),
    # --- train -----------------------------------------------------------------------------------------------
    ("train a binary file as config",
     lambda c: ((c.tmp / "c.yaml").write_bytes(bytes(range(256)) * 4), ["train", "generator", c.tmp / "c.yaml"])[1],
     r"c\.yaml", None),
    ("train --set optim.lr=.nan", lambda c: ["train", "generator", c.config(), "--set", "optim.lr=.nan"],
     r"optim\.lr.*nan", None),
    ("train --set seed above 2**64", lambda c: ["train", "generator", c.config(), "--set", f"seed={2 ** 64}"],
     r"seed.*18446744073709551616", None),
    ("train --set seed negative", lambda c: ["train", "generator", c.config(), "--set", "seed=-1"],
     r"seed.*-1", None),
    ("train output_dir a file",
     lambda c: ((c.tmp / "f").write_text("notes"), ["train", "generator", c.config(output_dir=str(c.tmp / "f"))])[1],
     r"f: the run folder \(output_dir\) is a file", None),
    ("train output_dir unwritable", lambda c: ["train", "generator", c.config(output_dir="/sys/run")],
     r"/sys/run: cannot create", no_sys),
    ("train model.init_from NaN weights",
     lambda c: (shutil.copytree(c.world / "run/checkpoints/step_00000002", c.tmp / "init"),
                put_nan(c.tmp / "init" / "model.safetensors"),
                ["train", "generator", c.config(model={"init_from": str(c.tmp / "init")})])[2],
     r"init/model\.safetensors.*nan", None),
    ("train --until -3", lambda c: ["train", "generator", c.config(), "--until", "-3"], r"--until.*-3", None),
    ("train --resume --until the checkpoint's step",
     lambda c: (c.run_copy(), ["train", "generator", c.config(), "--resume", "--until", "2"])[1],
     r"--until 2: the run is already at step 2", None),
    ("train --set device=bogus", lambda c: ["train", "generator", c.config(), "--set", "device=bogus"],
     r"'bogus'", None),
    ("train device cuda without CUDA", lambda c: ["train", "generator", c.config(device="cuda")],
     r"'cuda'.*available here", lambda: "CUDA is available" if has_device("cuda") else None),
    ("train --set device=mps without MPS", lambda c: ["train", "generator", c.config(), "--set", "device=mps"],
     r"'mps'.*available here", lambda: "MPS is available" if has_device("mps") else None),
    ("train manifest with invalid UTF-8",
     lambda c: ((c.tmp / "m.jsonl").write_bytes(b'{"image_path": "x.png", "text": "caf\xe9"}\n'),
                ["train", "generator", c.config(data={"manifests": [str(c.tmp / "m.jsonl")]})])[1],
     r"m\.jsonl:1: not UTF-8", None),
    ("train --resume a damaged checkpoint",
     lambda c: (c.run_copy(), (c.tmp / "run/checkpoints/step_00000002/model.safetensors").write_bytes(b"x"),
                ["train", "generator", c.config(), "--resume", c.tmp / "run/checkpoints/step_00000002"])[2],
     r"step_00000002/model\.safetensors", None),
    ("train --resume a checkpoint with a planted pickle", planted_pickle,
     r"optimizer/rank_00000\.safetensors: not a readable state file", None),
    ("train in a folder another run holds",
     lambda c: (hold_lock(c, c.tmp / "run"), ["train", "generator", c.config()])[1],
     r"in use by another run \(pid \d+", None),
    # --- export, parity --------------------------------------------------------------------------------------
    ("export a damaged checkpoint",
     lambda c: (c.run_copy(), (c.tmp / "run/checkpoints/step_00000002/trainer.json").write_text("{"),
                ["export", c.tmp / "run/checkpoints/step_00000002", c.tmp / "model_out"])[2],
     r"trainer\.json", None),
]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (run locks excluded: taking one is allowed)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != ".lock":
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("name,build,match,skip", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_status_2_and_changes_nothing(name, build, match, skip, world, tmp_path, capsys,
                                                            monkeypatch):
    if skip is not None and skip():
        pytest.skip(skip())
    monkeypatch.delenv("INFINITYSTAR_DEBUG", raising=False)
    c = Ctx(tmp_path, world, monkeypatch)
    try:
        argv = [str(a) for a in build(c)]
        before = snapshot(tmp_path, world)
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 2, (rc, err[-2000:])
        lines = err.splitlines()   # notes before the error (e.g. "resumed from ...") may precede it
        assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err[-3000:]
        assert sum(line.startswith("error") for line in lines) == 1 and err.endswith("\n"), err[-3000:]
        assert re.search(match, lines[-1]), err
        assert snapshot(tmp_path, world) == before
    finally:
        for fn in c.cleanups:
            fn()


def test_parity_on_a_malformed_transformer_folder_exits_2(tmp_path, capsys):
    src = Path(__file__).parent / "fixtures" / "infinitystar" / "transformer"
    shutil.copytree(src, tmp_path / "t")
    edit_json(tmp_path / "t" / "config.json", lambda j: j["kwargs"].update(depth="four"))
    before = snapshot(tmp_path)
    assert main(["parity", str(tmp_path / "t")]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ") and "malformed fixture" in err and "four" in err
    assert json.loads(out.strip().splitlines()[-1])["error"] in err
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback_of_a_bad_input(world, tmp_path, monkeypatch):
    from infinitystar.runtime import UserError
    monkeypatch.setenv("INFINITYSTAR_DEBUG", "1")
    with pytest.raises(UserError, match="is a folder"):
        main(gen(Ctx(tmp_path, world, monkeypatch), out=str(tmp_path)))


def test_upper_case_extension_is_written(world, tmp_path, capsys, monkeypatch):
    """`--out X.MP4` is an mp4 like `x.mp4`: accepted and written, not refused after the work (generate and
    reconstruct)."""
    out = tmp_path / "X.MP4"
    assert main(["generate", "--prompt", PROMPT, "--out", str(out), "--json"]) == 0
    assert out.read_bytes()[4:8] == b"ftyp"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"] == str(out)
    again = tmp_path / "R.MP4"
    assert main([str(a) for a in recon(Ctx(tmp_path, world, monkeypatch), out=again)]) == 0
    assert again.read_bytes()[4:8] == b"ftyp"


def test_long_prompt_is_a_note_naming_the_cut(world, tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["generate", "--prompt", " ".join([PROMPT] * 4), "--out", str(out)]) == 0
    assert out.is_file()
    err = capsys.readouterr().err
    assert re.search(r"note: prompt 0 has 44 words; the built-in text encoder reads \d+: \d+ cut", err), err


def test_nonfinite_logits_are_an_error_naming_the_value():
    from infinitystar.sampling.bits import NonFiniteLogits, sample_bits
    logits = torch.zeros(2, 3, 2)
    logits[1, 2, 0] = float("nan")
    with pytest.raises(NonFiniteLogits, match=r"nan"):
        sample_bits(logits, generator=torch.Generator().manual_seed(0))
    logits[1, 2, 0] = float("inf")
    with pytest.raises(NonFiniteLogits, match=r"inf"):
        sample_bits(logits, greedy=True)
