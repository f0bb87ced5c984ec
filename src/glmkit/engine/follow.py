"""Tensor parallelism, the engine side: rank 0 runs everything a user sees (scheduler, tokenizer, sampling, HTTP);
every model call it makes (a runner's step or fork, a reference forward pass) is first sent to the other ranks,
which run the same call on their share of the model, so the collectives inside meet. The other ranks run only
`follow`, until rank 0 says stop (when its process ends) or goes away (then they stop with the reason).
"""

from __future__ import annotations

import atexit
import functools
import sys

from glmkit import forward
from glmkit.engine.runner import ModelRunner
from glmkit.parallel import RankLost


def lead_or_follow(model, prefix_kv=None) -> None:
    """After a tensor-parallel load: rank 0 goes on (and tells the others to stop when its process ends); the
    other ranks follow rank 0 here and end their process when it stops."""
    world = getattr(model, "tp", None)
    if world is None:
        return
    if world.rank == 0:
        atexit.register(_stop, world)
        return
    try:
        follow(model, prefix_kv)
    except RankLost as e:
        print(f"glmkit (rank {world.rank}): {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    world.leave()
    raise SystemExit(0)


def _stop(world) -> None:
    try:
        world.send(("stop",))
        world.leave()
    except RankLost:
        pass  # the others are gone already


def follow(model, prefix_kv=None) -> None:
    """Run what rank 0 sends, in order: ("step" | "fork", runner id, arguments...), ("forward", function name,
    args, kwargs), ("stop",)."""
    world, runners = model.tp, {}
    while True:
        message = world.receive()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "forward":
            call = functools.partial(getattr(forward, message[1]).__wrapped__, model, *message[2], **message[3])
        else:
            if message[1] not in runners:
                runners[message[1]] = ModelRunner(model, prefix_kv)
            call = functools.partial(getattr(runners[message[1]], kind), *message[2:])
        try:
            call()
        except RankLost:
            raise
        except Exception:  # noqa: BLE001 - a request's own failure (bad input): rank 0 meets it too and goes on
            pass
