"""generate-pseudo on N processes (torchrun) versus one, on the same images: the scaling ratio.

Both layouts run the real command, `duda generate-pseudo`, on a dataset index of synthetic
target images and a randomly initialised checkpoint, alternating, best of `--repeats`, and get
the same CPU threads in all: one process with T threads against N processes with T/N each
(T = `--threads`, default the machine's cores). The times are whole command runs, so they
include starting Python, torchrun and the process group (about 3 s here); use enough images to
make that small. On a multi-GPU node, `--device cuda --processes 4` measures 4 GPUs against 1.

    python benchmarks/generate_scaling.py [--images 96] [--processes 2] [--size 128 256]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import add_common_arguments, write_checkpoint, write_index

from stages.config import ModelConfig
from stages.nn.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.set_defaults(images=96)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads shared by the processes of each layout")
    args = parser.parse_args()

    model_config = ModelConfig(backbone=args.backbone, width_multiplier=args.width,
                               normalization="imagenet_rgb")
    height, width = args.size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = write_index(root / "data", args.images, height, width)
        write_checkpoint(root / "ckpt", build_model(model_config, 19), model_config)
        config = root / "bench.yaml"
        config.write_text(yaml.safe_dump({
            "experiment": "bench",
            "data": {"source": {"layout": "synthetic"}, "target": {"layout": "synthetic"}},
            "input": {"target_size": [height, width], "crop_size": [height, width]},
            "model": model_config.model_dump(mode="json"),
            "generate_pseudo": {"batch_size": args.batch_size, "num_workers": args.workers,
                                "model": "student"},
        }))
        command = ["-m", "duda_cli", "generate-pseudo", "-c", str(config), "--data", str(index),
                   "--checkpoint", str(root / "ckpt"), "--out", str(root / "pseudo"),
                   "--force", "--quiet", "--device", args.device]
        torchrun = Path(sys.executable).parent / "torchrun"
        layouts = {
            1: ([sys.executable, *command], args.threads),
            args.processes: ([str(torchrun), "--standalone", "--nproc_per_node",
                              str(args.processes), *command],
                             max(1, args.threads // args.processes)),
        }

        def timed(processes: int) -> float:
            launch, threads = layouts[processes]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            start = time.perf_counter()
            subprocess.run(launch, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - start

        best = {n: float("inf") for n in layouts}
        for _ in range(args.repeats):
            for n in layouts:
                best[n] = min(best[n], timed(n))

    one, many = args.images / best[1], args.images / best[args.processes]
    print(f"device {args.device}, {args.backbone} (width {args.width:g}), {args.images} images "
          f"{height}x{width}, batch {args.batch_size}, {args.threads} threads in all, "
          f"best of {args.repeats}")
    print(f"1 process:     {one:.2f} images/s ({best[1]:.1f} s)")
    print(f"{args.processes} processes:   {many:.2f} images/s ({best[args.processes]:.1f} s)")
    print(f"scaling ratio {args.processes} / 1: {many / one:.3f} "
          f"(efficiency {many / one / args.processes:.2f})")


if __name__ == "__main__":
    main()
