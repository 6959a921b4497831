"""A training process for the run-dir lock tests (tests/test_runs.py).

    python _run_worker.py --root DIR --run-id NAME [--resume] [--hold MARKER RELEASE] [--die]

--hold: write MARKER once training started (the lock is held), then wait (inside the first batch) until the file
RELEASE exists. --die: end the process with os._exit inside the first batch, leaving its lock file behind.
Exit code 0 after training, 3 (with the error on stderr) when train() raised.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from conftest import make_loader, make_model, quiet_params
from super_trainer import Callback, Trainer


class Hold(Callback):
    def __init__(self, marker: Path, release: Path) -> None:
        self.marker, self.release = marker, release

    def on_train_batch_start(self, context) -> None:
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not self.release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)


class Die(Callback):
    def on_train_batch_start(self, context) -> None:
        sys.stdout.flush()
        os._exit(17)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hold", nargs=2)
    parser.add_argument("--die", action="store_true")
    args = parser.parse_args()
    callbacks = []
    if args.hold:
        callbacks.append(Hold(Path(args.hold[0]), Path(args.hold[1])))
    if args.die:
        callbacks.append(Die())
    params = quiet_params(max_epochs=1, run_id=args.run_id, resume=args.resume, phase_callbacks=callbacks)
    try:
        result = Trainer("locked", args.root, device="cpu").train(
            model=make_model(), training_params=params, train_loader=make_loader(), valid_loader=make_loader(16))
    except Exception as err:  # the lock refusal, reported like the CLI does: one line
        sys.stderr.write(f"{type(err).__name__}: {err}\n")
        return 3
    print(result.ckpt_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
