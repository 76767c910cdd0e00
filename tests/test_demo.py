"""The web demo's handlers, called directly (no browser, no server): results, seeds, notes, and every bad input as
a message. With gradio installed the page is also built, and a port in use refused; tests/test_demo_browser.py
serves it to a browser."""
import socket

import numpy as np
import pytest

from infinitystar.cli import main as cli_main
from infinitystar.demo import handlers as h
from infinitystar.demo.handlers import DemoModel
from infinitystar.generation import generate_video
from infinitystar.media import export_to_video, load_image, load_video
from infinitystar.pipelines.infinity import InfinityPipeline
from infinitystar.shapes import world

PROMPT = "a large red circle moving right slowly on a black background"
KNOBS = dict(seed=3, randomize=False, guidance=None, temperature="")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    model = DemoModel("default", out_dir=tmp_path_factory.mktemp("demo_out"))
    assert model.error is None and model.family == "infinitystar"
    return model


def test_text_to_video_is_the_generate_command(demo, tmp_path):
    reply = demo.text_to_video(PROMPT, 17, **KNOBS)
    assert reply.error is None and reply.seed == 3 and reply.frames == 17
    assert reply.path.endswith(".mp4") and "Seed **3**" in reply.message and "17 frames of 64x64" in reply.message
    frames = load_video(reply.path)
    assert frames.shape == (17, 64, 64, 3)
    # no second generation path: the CLI with the same prompt, seed and defaults writes the same video
    cli_out = tmp_path / "cli.mp4"
    assert cli_main(["generate", "--prompt", PROMPT, "--seed", "3", "--out", str(cli_out)]) == 0
    assert np.array_equal(load_video(cli_out), frames)
    # the guidance and temperature boxes reach the pipeline
    other = demo.text_to_video(PROMPT, 17, seed=3, randomize=False, guidance=1.0, temperature="1.5")
    assert other.error is None and not np.array_equal(load_video(other.path), frames)


def test_text_to_image_and_a_random_seed_that_can_be_repeated(demo):
    reply = demo.text_to_image("a large green triangle on a gray background", 0, True, None, "")
    assert reply.error is None and reply.path.endswith(".png") and "an image of 64x64" in reply.message
    assert 0 <= reply.seed <= h.MAX_SEED and f"Seed **{reply.seed}**" in reply.message
    again = demo.text_to_image("a large green triangle on a gray background", reply.seed, False, None, "")
    assert np.array_equal(load_image(again.path), load_image(reply.path))
    assert load_image(reply.path).shape == (64, 64, 3)


def test_unknown_words_are_a_warning_in_the_reply(demo):
    reply = demo.text_to_video(PROMPT + " with sparkles", 17, **KNOBS)
    assert reply.error is None
    assert any("unknown word(s) sparkles, with" in n for n in reply.notes)
    assert "⚠️ unknown word(s) sparkles, with" in reply.message


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="   "), "type a prompt first"),
    (dict(prompt=None), "type a prompt first"),
    (dict(seed=-1), "the seed must be a whole number"),
    (dict(seed=1.5), "the seed must be a whole number"),
    (dict(seed=None), "the seed must be a whole number"),
    (dict(temperature="hot"), "temperature must be a positive number"),
    (dict(temperature="0"), "temperature must be a positive number"),
    (dict(frames=18), "got 18; use 17"),
])
def test_bad_input_is_a_message(demo, kwargs, message):
    args = dict(prompt=PROMPT, frames=17, **KNOBS) | kwargs
    reply = demo.text_to_video(args["prompt"], args["frames"], args["seed"], args["randomize"], args["guidance"],
                               args["temperature"])
    assert reply.path is None and message in reply.error
    assert reply.message.startswith("**Error:**") and message in reply.message


def test_image_to_video(demo, tmp_path):
    prompt, image, _ = h.write_example_media(tmp_path / "examples")[3]        # a held-out pair: purple triangle
    assert "purple triangle" in prompt
    reply = demo.image_to_video(prompt, image, 17, **KNOBS)
    assert reply.error is None and load_video(reply.path).shape == (17, 64, 64, 3)
    missing = demo.image_to_video(prompt, None, 17, **KNOBS)
    assert "upload a first frame" in missing.error
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    unreadable = demo.image_to_video(prompt, str(bad), 17, **KNOBS)
    assert unreadable.path is None and "cannot read image" in unreadable.error


def test_continuation(demo, tmp_path):
    prompt, _, video = h.write_example_media(tmp_path / "examples")[0]
    given = load_video(video)
    assert given.shape == (17, 64, 64, 3)
    reply = demo.continuation(prompt, video, 33, **KNOBS)
    assert reply.error is None and load_video(reply.path).shape == (33, 64, 64, 3)
    short = tmp_path / "short.mp4"
    export_to_video(given[:5], short)
    too_short = demo.continuation(prompt, str(short), 33, **KNOBS)
    assert "continuation needs at least 17 frames" in too_short.error
    nothing_left = demo.continuation(prompt, video, 17, **KNOBS)
    assert "nothing left to generate" in nothing_left.error
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    assert "cannot read video" in demo.continuation(prompt, str(bad), 33, **KNOBS).error
    assert "upload a video" in demo.continuation(prompt, None, 33, **KNOBS).error


def test_interactive_adds_a_clip_per_submit(demo, monkeypatch):
    prompts = h.interactive_examples()
    session, first = demo.interactive_submit(None, prompts[0], 5, False, None, "")
    assert first.error is None and first.seed == 5 and session.clips == 1
    assert load_video(first.path).shape == (17, 64, 64, 3)
    shown = session.stream.video().copy()
    # a failed submit keeps the video and says why
    session, empty = demo.interactive_submit(session, "", 5, False, None, "")
    assert "type a prompt" in empty.error and session.clips == 1 and empty.seed == 5
    # later submits keep the first clip's seed, whatever the seed box says now
    session, second = demo.interactive_submit(session, prompts[1] + " zzz", 99, True, None, "")
    assert second.error is None and second.seed == 5 and session.clips == 2
    assert load_video(second.path).shape == (33, 64, 64, 3)
    assert np.array_equal(session.stream.video()[:17], shown)           # the clips already shown stay as they were
    assert "2 clip(s), 33 frames of 64x64 so far" in second.message and prompts[1] in second.message
    assert any("unknown word(s) zzz" in n for n in second.notes)
    # the streaming API gives what the pipeline's prompt-per-clip call gives (the path `generate` takes)
    batch = generate_video(demo.pipe, [prompts[0], prompts[1] + " zzz"], 33, seed=5)
    assert np.array_equal(session.stream.video(), batch.frames)
    monkeypatch.setattr(h, "MAX_INTERACTIVE_CLIPS", 2)
    session, capped = demo.interactive_submit(session, prompts[2], 5, False, None, "")
    assert "press reset" in capped.error and session.clips == 2
    fresh = demo.interactive_reset()
    assert fresh.clips == 0 and fresh.seed is None


def test_a_model_folder_that_does_not_load_is_a_message(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"family": "infinitystar", "height": 64}')
    for folder in (tmp_path / "missing", broken):
        model = DemoModel(folder, out_dir=tmp_path / "out")
        assert model.pipe is None and model.error.startswith(f"the model did not load: {folder}")
        assert model.description.startswith("no model")
        for reply in (model.text_to_video(PROMPT, 17, **KNOBS), model.text_to_image(PROMPT, 0, False, None, ""),
                      model.interactive_submit(None, PROMPT, 0, False, None, "")[1]):
            assert reply.path is None and "did not load" in reply.error
    assert "unknown device" in DemoModel("default", device="tpu", out_dir=tmp_path / "out").error


def test_infinity_model_folder(tmp_path):
    InfinityPipeline.random_tiny(seed=0).save_pretrained(tmp_path / "t2i")
    model = DemoModel(tmp_path / "t2i", out_dir=tmp_path / "out")
    assert model.error is None and model.family == "infinity" and "Infinity text-to-image" in model.description
    square = model.infinity_image("a large red circle on a black background", h.DEFAULT_CHOICE, h.DEFAULT_CHOICE,
                                  1, False, None, "")
    assert square.error is None and load_image(square.path).shape == (64, 64, 3)
    wide = model.infinity_image("a large red circle on a black background", "16:9", h.DEFAULT_CHOICE, 1, False,
                                None, "")
    assert wide.error is None and "template h/w 0.571" in wide.message
    assert any("snapped to the nearest template" in n for n in wide.notes)     # the snap is a note on the page
    h_, w_ = load_image(wide.path).shape[:2]
    assert w_ > h_
    assert "aspect ratio 'wide'" in model.infinity_image("a red circle", "wide", h.DEFAULT_CHOICE, 1, False, None,
                                                         "").error
    assert "this tab does not apply" in model.text_to_video(PROMPT, 17, **KNOBS).error


def test_vocabulary_note_and_examples(demo):
    note = demo.vocabulary_note()
    for pair in ("purple triangle", "yellow circle", "cyan square"):
        assert pair in note
    assert f"knows these {len(world.vocabulary())} words and nothing else: {', '.join(world.vocabulary())}" in note
    assert "Any other word is ignored" in note
    examples = h.image_examples() + h.video_examples() + h.interactive_examples()
    for caption in examples:
        world.parse_caption(caption)                            # every example is an exact Shapes World caption
    for pair in ("purple triangle", "yellow circle", "cyan square"):
        assert any(pair in c for c in h.image_examples()) and any(pair in c for c in h.video_examples())
    assert any("cyan square" in c for c in h.interactive_examples())


def test_the_page_builds_for_each_kind_of_model(demo, tmp_path):
    pytest.importorskip("gradio", reason="the page needs the demo extra: pip install -e '.[demo]'")
    from infinitystar.demo.app import build_app

    def ids(app):
        return {b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None)}

    assert {"tab-t2i", "tab-t2v", "tab-i2v", "tab-continue", "tab-interactive", "vocabulary", "t2v-video",
            "interactive-reset"} <= ids(build_app(demo))
    broken = build_app(DemoModel(tmp_path / "missing", out_dir=tmp_path / "out"))
    assert "model-error" in ids(broken)
    InfinityPipeline.random_tiny(seed=0).save_pretrained(tmp_path / "t2i")
    infinity = ids(build_app(DemoModel(tmp_path / "t2i", out_dir=tmp_path / "out2")))
    assert {"tab-infinity-t2i", "infinity-ratio"} <= infinity and "tab-t2v" not in infinity


def test_a_port_in_use_is_a_user_error():
    pytest.importorskip("gradio", reason="the page needs the demo extra: pip install -e '.[demo]'")
    from infinitystar.demo.app import serve
    from infinitystar.runtime import UserError
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}"):
            serve("default", port=port)
