"""Running a command: a user error becomes one line `error: <message>` on stderr and exit status 2; anything else
is a bug and keeps its traceback. `--debug` (or INFINITYSTAR_DEBUG=1) shows the traceback of user errors too."""
from __future__ import annotations

import os
import sys
from typing import Callable

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.manifest import ManifestError
from infinitystar.media import MediaError
from infinitystar.runtime import UserError
from infinitystar.train.config import ConfigError

USER_ERRORS = (UserError, ConfigError, CheckpointError, MediaError, ManifestError)
EXIT_USER_ERROR = 2


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("INFINITYSTAR_DEBUG", "") not in ("", "0")


def run_command(func: Callable[..., int], args) -> int:
    try:
        return func(args)
    except USER_ERRORS as e:
        if debug_requested(getattr(args, "debug", False)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
