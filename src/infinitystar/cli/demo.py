"""`infinitystar demo`: serve the web page."""
from __future__ import annotations

import os

from infinitystar.runtime import UserError


def _cmd_demo(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # nothing leaves the machine
    try:
        from infinitystar.demo.app import serve
    except ImportError as e:
        raise UserError(f"the demo needs the optional 'demo' extra ({e}): pip install -e \".[demo]\"") from None
    return serve(args.model, host=args.host, port=args.port, device=args.device)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="a web page for every task of a model (Gradio; pip install -e '.[demo]')")
    p.add_argument("--model", default="default", help="model folder, InfinityStar or Infinity (default: the shipped "
                                                      "model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    p.set_defaults(func=_cmd_demo)
