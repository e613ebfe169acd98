"""Run a `duda` command with one fault injected, for the crash-safety tests.

    python tests/fault_runner.py POINT COUNT -- duda arguments…

At the COUNT-th time the process reaches POINT it is killed with SIGKILL (no cleanup, no
`finally`, as a power cut or the OOM killer would), or, for `pause`, it writes the file named by
$FAULT_PAUSED and waits until $FAULT_GO exists. Points:

- `step`: the start of a self-training step;
- `store_write`: inside a pseudo-label store write, after the labels chunk and before the
  confidence chunk;
- `checkpoint_tmp`: inside an atomic checkpoint save, after the temporary `.<name>.tmp-<pid>`
  file is complete and before it replaces the checkpoint;
- `snapshot`: in the middle of hard-linking the store into a snapshot;
- `pause`: the start of a self-training step, paused instead of killed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _trigger(point: str, count: int):
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == count

    def fire() -> None:
        if point == "pause":
            Path(os.environ["FAULT_PAUSED"]).write_text(str(os.getpid()))
            while not Path(os.environ["FAULT_GO"]).exists():
                time.sleep(0.05)
            return
        os.kill(os.getpid(), signal.SIGKILL)

    return hit, fire


def install(point: str, count: int) -> None:
    import stages.artifacts.checkpoint
    import stages.self_train
    import stages.store.pseudo_store
    import stages.store.working_copy

    hit, fire = _trigger(point, count)
    if point in ("step", "pause"):
        original_step = stages.self_train.self_train_step

        def step(*args, **kwargs):
            if hit():
                fire()
            return original_step(*args, **kwargs)

        stages.self_train.self_train_step = step
    elif point == "store_write":
        store_class = stages.store.pseudo_store.PseudoLabelStore
        original_write = store_class.write_validated

        def write(self, i, labels, levels):
            if hit():
                self._array("labels")[i] = labels
                fire()
            return original_write(self, i, labels, levels)

        store_class.write_validated = write
    elif point == "checkpoint_tmp":
        torch = stages.artifacts.checkpoint.torch
        original_save = torch.save

        def save(obj, handle, *args, **kwargs):
            original_save(obj, handle, *args, **kwargs)
            if hit():
                handle.flush()
                fire()

        torch.save = save
    elif point == "snapshot":
        original_link = stages.store.working_copy.link_or_copy

        def link(src, dst):
            original_link(src, dst)
            if hit():
                fire()

        stages.store.working_copy.link_or_copy = link
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def main() -> None:
    point, count, separator, *arguments = sys.argv[1:]
    assert separator == "--", "usage: fault_runner.py POINT COUNT -- ARGS…"
    install(point, int(count))
    from duda_cli.app import app

    app(arguments, prog_name="duda")


if __name__ == "__main__":
    main()
