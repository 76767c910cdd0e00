"""The Gradio page of `infinitystar demo`: one tab per task, each a thin wrapper over a handler of
`infinitystar.demo.handlers` (which does the work and turns every bad input into a message)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import gradio as gr

from infinitystar.demo import handlers as h
from infinitystar.demo.handlers import DemoModel, Reply
from infinitystar.runtime import UserError

# Frames are 64x64 for the built-in model: show them large and sharp, not as a blur.
CSS = """
.result video, .result img { image-rendering: pixelated; }
.result img { width: 100%; height: 100%; object-fit: contain; }
.status-error { color: var(--error-text-color); }
"""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
GENERATE = "generate"           # one concurrency group: one generation at a time shares the model and the cores


def _show(reply: Reply):
    """A reply as the page shows it: toasts for the notes, the seed used in the seed box (unchanged when the
    request failed before a seed was chosen)."""
    for note in reply.notes:
        gr.Warning(note)
    seed = gr.skip() if reply.seed is None else reply.seed
    return reply.path, seed, reply.message


def _upload_path(value) -> Optional[str]:
    """The file path of an upload as the event receives it unprocessed (a FileData dict), or as a plain path."""
    if isinstance(value, dict):
        value = value.get("path")
    return str(value) if value else None


def _seed_controls(prefix: str):
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=0, maximum=h.MAX_SEED, label="seed", elem_id=f"{prefix}-seed")
        randomize = gr.Checkbox(value=False, label="random seed (the seed used is shown)",
                                elem_id=f"{prefix}-random")
    return seed, randomize


def _sampling_controls(prefix: str, guidance: float, temperature_default: str):
    with gr.Row():
        guidance = gr.Slider(1.0, 10.0, value=guidance, step=0.5, label="guidance (CFG scale; 1 = off)",
                             elem_id=f"{prefix}-guidance")
        temperature = gr.Textbox(value="", label="temperature", placeholder=f"the model's: {temperature_default}",
                                 info="empty: the model's default", elem_id=f"{prefix}-temperature")
    return guidance, temperature


def _frames_slider(prefix: str, value: int):
    return gr.Slider(5, 65, value=value, step=4, label="frames (1 + 4k; 16 per clip)",
                     elem_id=f"{prefix}-frames")


def _status(prefix: str):
    return gr.Markdown(elem_id=f"{prefix}-status")


def _task_tab(key: str, label: str, run: Callable[..., Reply], guidance: float, tau: str, *, examples: list,
              examples_label: str, frames: Optional[int] = None, media: Optional[Callable] = None,
              prompt_label: str = "prompt", result_label: Optional[str] = None) -> None:
    """A one-shot task: [an upload], a prompt, Generate, [frames], seed and sampling knobs, examples | the result
    (a video, or an image without `frames`) and its status line. `run(prompt, upload, frames, seed, randomize,
    guidance, temperature)` is the handler."""
    with gr.Tab(label, id=key, elem_id=f"tab-{key}"):
        with gr.Row():
            with gr.Column():
                upload = media() if media is not None else gr.State(None)
                prompt = gr.Textbox(label=prompt_label, lines=2, elem_id=f"{key}-prompt")
                button = gr.Button("Generate", variant="primary", elem_id=f"{key}-generate")
                count = _frames_slider(key, frames) if frames is not None else gr.State(1)
                seed, randomize = _seed_controls(key)
                guidance_box, temperature = _sampling_controls(key, guidance, tau)
                gr.Examples(examples, inputs=[prompt, upload] if media is not None else [prompt], label=examples_label)
            with gr.Column():
                if frames is None:
                    out = gr.Image(label=result_label or "image", type="filepath", format="png", interactive=False,
                                   buttons=["download"], height=320, elem_id=f"{key}-image", elem_classes="result")
                else:
                    out = gr.Video(label=result_label or "video", interactive=False, buttons=["download"],
                                   height=320, loop=True, autoplay=True, elem_id=f"{key}-video",
                                   elem_classes="result")
                status = _status(key)

        def generate(prompt, upload, frames, seed, randomize, guidance, temperature,
                     progress=gr.Progress(track_tqdm=True)):     # progress: Gradio follows the sampler's tqdm bar
            return _show(run(prompt, _upload_path(upload), frames, seed, randomize, guidance, temperature))

        # Uploads reach the handler unopened (preprocess=False): an unreadable file is then the handler's message,
        # not a failure inside Gradio's image decoding.
        gr.on([button.click, prompt.submit], generate,
              [prompt, upload, count, seed, randomize, guidance_box, temperature], [out, seed, status],
              concurrency_id=GENERATE, preprocess=media is None)


def _infinitystar_tabs(model: DemoModel) -> None:
    d = model.pipe.defaults if model.pipe is not None else None
    guidance = d.guidance_scale if d is not None else 3.0
    tau = f"{d.tau_image} first frame, {d.tau_video} video" if d is not None else "the model's"
    media = h.write_example_media(model.out_dir / "examples")

    held = "(the last three: held-out pairs)"
    _task_tab("t2i", "Text to image", lambda p, _media, _frames, *knobs: model.text_to_image(p, *knobs, progress=True),
              guidance, tau, examples=h.image_examples(), examples_label=f"Shapes World prompts {held}")
    _task_tab("t2v", "Text to video", lambda p, _media, *rest: model.text_to_video(p, *rest, progress=True),
              guidance, tau, frames=17, examples=h.video_examples(), examples_label=f"Shapes World prompts {held}")
    _task_tab("i2v", "Image to video", lambda *args: model.image_to_video(*args, progress=True), guidance, tau,
              frames=17, media=lambda: gr.Image(label="first frame (upload an image)", type="filepath",
                                                sources=["upload"], height=200, elem_id="i2v-input",
                                                elem_classes="result"),
              examples=[[p, img] for p, img, _ in media],
              examples_label=f"Rendered Shapes World first frames {held}", prompt_label="prompt (how it moves on)")
    _task_tab("continue", "Continuation", lambda *args: model.continuation(*args, progress=True), guidance, tau,
              frames=33, media=lambda: gr.Video(label="video to continue (at least 17 frames)", sources=["upload"],
                                                include_audio=True, height=200, elem_id="continue-input",
                                                elem_classes="result"),
              examples=[[p, vid] for p, _, vid in media], examples_label=f"Rendered Shapes World clips {held}",
              prompt_label="prompt (how it goes on)", result_label="the whole video (given frames first)")

    with gr.Tab("Interactive", id="interactive", elem_id="tab-interactive"):
        gr.Markdown("Type a prompt and press *Add clip*: the video goes on by one clip (16 frames) with that "
                    "prompt, from where it stopped, and the page shows the whole video so far. Every clip takes "
                    "about as long as the first, however long the video is. Seed, guidance and temperature are "
                    f"those of the first clip until *Reset* (at most {h.MAX_INTERACTIVE_CLIPS} clips).")
        session = gr.State(None, time_to_live=3600)
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="next clip's prompt", lines=2, elem_id="interactive-prompt")
                with gr.Row():
                    button = gr.Button("Add clip", variant="primary", elem_id="interactive-add")
                    reset = gr.Button("Reset", elem_id="interactive-reset")
                seed, randomize = _seed_controls("interactive")
                guidance_box, temperature = _sampling_controls("interactive", guidance, tau)
                gr.Examples(h.interactive_examples(), inputs=[prompt],
                            label="One object turning clip by clip (a held-out pair: cyan square)")
            with gr.Column():
                out = gr.Video(label="the video so far", interactive=False, buttons=["download"], height=320,
                               loop=True, autoplay=True, elem_id="interactive-video", elem_classes="result")
                status = _status("interactive")

        def interactive(session, prompt, seed, randomize, guidance, temperature):
            session, reply = model.interactive_submit(session, prompt, seed, randomize, guidance, temperature)
            path, seed, message = _show(reply)
            # keep the video so far on screen when a submit fails, and the prompt to fix
            return (session, gr.skip() if path is None else path, seed, message,
                    gr.skip() if reply.error else "")

        gr.on([button.click, prompt.submit], interactive,
              [session, prompt, seed, randomize, guidance_box, temperature], [session, out, seed, status, prompt],
              concurrency_id=GENERATE)
        reset.click(lambda: (model.interactive_reset(), None, ""), None, [session, out, status],
                    concurrency_id=GENERATE)


def _infinity_tab(model: DemoModel) -> None:
    d = model.pipe.defaults
    with gr.Tab("Text to image", id="infinity-t2i", elem_id="tab-infinity-t2i"):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="infinity-prompt")
                button = gr.Button("Generate", variant="primary", elem_id="infinity-generate")
                with gr.Row():
                    ratio = gr.Dropdown(list(h.ASPECT_RATIOS), value=h.DEFAULT_CHOICE, allow_custom_value=True,
                                        label="aspect ratio (width:height, or h/w)", elem_id="infinity-ratio")
                    pn = gr.Dropdown(list(h.PIXEL_BUDGETS), value=h.DEFAULT_CHOICE, label="pixel budget",
                                     elem_id="infinity-pn")
                seed, randomize = _seed_controls("infinity")
                guidance_box, temperature = _sampling_controls("infinity", d.guidance_scale, str(d.temperature))
                gr.Examples(h.image_examples(), inputs=[prompt],
                            label="Shapes World prompts (the last three: held-out pairs)")
            with gr.Column():
                out = gr.Image(label="image", type="filepath", format="png", interactive=False,
                               buttons=["download"], height=384, elem_id="infinity-image", elem_classes="result")
                status = _status("infinity")

        def infinity_image(prompt, ratio, pn, seed, randomize, guidance, temperature):
            return _show(model.infinity_image(prompt, ratio, pn, seed, randomize, guidance, temperature))

        gr.on([button.click, prompt.submit], infinity_image,
              [prompt, ratio, pn, seed, randomize, guidance_box, temperature], [out, seed, status],
              concurrency_id=GENERATE)


def build_app(model: DemoModel) -> gr.Blocks:
    """The page for a loaded model (or for the error of one that did not load: every tab then says so)."""
    with gr.Blocks(title="infinitystar demo", analytics_enabled=False) as app:
        gr.Markdown(f"# infinitystar demo\nServing {model.description}.")
        if model.error:
            gr.Markdown(f"**Error:** {model.error}. Restart `infinitystar demo` with `--model` set to a model "
                        f"folder (or without it, for the built-in model).", elem_id="model-error",
                        elem_classes="status-error")
        note = model.vocabulary_note()
        if note:
            with gr.Accordion("What the model understands", open=True):
                gr.Markdown(note, elem_id="vocabulary")
        with gr.Tabs():
            if model.family == "infinity" and model.pipe is not None:
                _infinity_tab(model)
            else:
                _infinitystar_tabs(model)
    app.queue(default_concurrency_limit=1)
    return app


def serve(model: str = "default", host: str = "127.0.0.1", port: int = 7860, device: str = "cpu") -> int:
    """Load the model, serve the page until interrupted. A model that does not load still gets a page (that says
    why); a port in use is a UserError."""
    demo_model = DemoModel(model, device)
    if demo_model.error:
        print(f"warning: {demo_model.error}; the page says so", file=sys.stderr)
    app = build_app(demo_model)
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                               ssr_mode=False, share=False, allowed_paths=[str(Path(demo_model.out_dir))],
                               css=CSS, footer_links=["gradio"], show_error=True)
    except OSError as e:
        demo_model.close()
        raise UserError(f"cannot serve on {host}:{port}: {e}") from None
    scope = ("only this machine can open it; --host 0.0.0.0 opens it to the network" if host in LOCAL_HOSTS
             else "machines that can reach this address can open it")
    print(f"infinitystar demo on {url}: bound to {host}, {scope}. Serving {demo_model.description}. Ctrl+C stops "
          f"it.", flush=True)
    try:
        app.block_thread()
    finally:
        demo_model.close()
    return 0
