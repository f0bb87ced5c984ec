"""`glmkit compile [MODEL]`: compile the decode steps (one row, and 2-16 rows) ahead of time, so that later runs
find the packages in $GLMKIT_HOME/compiled and start decoding compiled in a second or two. `--list` shows the packages
there (model, size, last use), `--clear` removes them all; after each build only the 3 most recently used
packages of each model are kept.
"""

from __future__ import annotations

import argparse

from glmkit.cli.common import add_model_args, load_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the compiled packages on disk and exit")
    what.add_argument("--clear", action="store_true", help="remove every compiled package and exit")


def main(args: argparse.Namespace) -> int:
    from glmkit.engine import packages
    from glmkit.engine.compiled import MAX_ROWS
    from glmkit.errors import GlmkitError

    if args.list or args.clear:
        return _manage(args.clear)
    args.eager = True  # compiled below, in the foreground
    llm = load_model(args)
    decoder = _with_ticker(llm.compile)  # both steps: the one-row step and the batched one (serve's)
    if not decoder.ready:
        raise GlmkitError(f"compiling failed ({decoder.error}); eager decoding still works.")
    verb = "found the compiled decode step" if decoder.cached else "compiled the decode step"
    print(f"{verb} of {args.model} in {decoder.seconds:.1f} s: {decoder.path}")
    if decoder.rows_ready:
        print(f"batched steps (2-{MAX_ROWS} rows) compiled too: {packages.companion(decoder.path)}")
    else:
        print(f"batched steps decode eagerly: {decoder.rows_error}")
    return 0


def _with_ticker(work):
    """work() in a thread while a line on a terminal counts the seconds (compiling takes a minute or more)."""
    import sys
    import threading

    from tqdm import tqdm

    box = []
    thread = threading.Thread(target=lambda: box.append(work()), daemon=True)
    thread.start()
    with tqdm(desc="compiling the decode step", bar_format="{desc}: {elapsed}", disable=not sys.stderr.isatty(),
              leave=False) as ticker:
        while thread.is_alive():
            thread.join(timeout=0.5)
            ticker.refresh()
    return box[0]


def _manage(clear: bool) -> int:
    import time

    from glmkit.engine import packages
    from glmkit.llm import compiled_dir

    directory = compiled_dir()
    if clear:
        print(f"removed {packages.clear(directory)} compiled package(s) from {directory}")
        return 0
    found = packages.list_packages(directory)
    for p in found:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["used"]))
        print(f"{p['path'].name}  {p['mb']:8.1f} MB  last used {used}  {p['model']}")
    print(f"{len(found)} compiled package(s) in {directory}")
    return 0
