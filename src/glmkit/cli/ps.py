"""`glmkit ps`: the `glmkit serve` processes running on this machine (started by this user), with their
addresses, models and uptimes."""

from __future__ import annotations

import argparse
import time


def add_args(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    from glmkit.loaders.cache import running_servers

    servers = running_servers()
    if not servers:
        print("no glmkit servers running")
        return 0
    print("PID      ADDRESS                          MODEL  (UP)")
    for s in servers:
        up = time.time() - s.get("started", time.time())
        print(f"{s['pid']:<8} {s.get('url', '?'):<32} {s.get('model', '?')}  ({up / 60:.0f} min)")
    return 0
