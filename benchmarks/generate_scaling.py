"""generate-pseudo on N processes (torchrun) versus one, on the same images: the scaling ratio.

Every layout runs the real command, `duda generate-pseudo`, on a dataset index of synthetic
target images and a randomly initialised checkpoint, alternating, best of `--repeats`. With
T = `--threads` CPU threads (default: the machine's cores) the layouts are
- 1 process with T/N threads: one worker, as one GPU would be;
- N processes with T/N threads each: N workers (the ratio to the line above is the scaling);
- 1 process with all T threads: the same CPU as the N processes, used by one.
The times are whole command runs, so they include starting Python, torchrun and the process
group (about 3 s here); use enough images to make that small. On a multi-GPU node,
`--device cuda --processes 4` measures 4 GPUs against 1.

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

from stages.config import DeepLabV2Config
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

    model_config = DeepLabV2Config(backbone=args.backbone, width_multiplier=args.width,
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
            "generate_pseudo": {"inference": {"batch_size": args.batch_size,
                                              "num_workers": args.workers, "model": "student"}},
        }))
        command = ["-m", "duda_cli", "generate-pseudo", "-c", str(config), "--data", str(index),
                   "--checkpoint", str(root / "ckpt"), "--out", str(root / "pseudo"),
                   "--force", "--quiet", "--device", args.device]
        torchrun = Path(sys.executable).parent / "torchrun"
        share = max(1, args.threads // args.processes)
        layouts = {  # name: (launch, threads per process)
            "one worker": ([sys.executable, *command], share),
            "N workers": ([str(torchrun), "--standalone", "--nproc_per_node",
                           str(args.processes), *command], share),
            "one process, all threads": ([sys.executable, *command], args.threads),
        }

        def timed(name: str) -> float:
            launch, threads = layouts[name]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            start = time.perf_counter()
            subprocess.run(launch, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - start

        best = {name: float("inf") for name in layouts}
        for _ in range(args.repeats):
            for name in layouts:
                best[name] = min(best[name], timed(name))

    rate = {name: args.images / seconds for name, seconds in best.items()}
    n = args.processes
    print(f"device {args.device}, {args.backbone} (width {args.width:g}), {args.images} images "
          f"{height}x{width}, batch {args.batch_size}, best of {args.repeats}")
    print(f"1 process x {share} thread(s):   {rate['one worker']:.2f} images/s "
          f"({best['one worker']:.1f} s)")
    print(f"{n} processes x {share} thread(s): {rate['N workers']:.2f} images/s "
          f"({best['N workers']:.1f} s)")
    print(f"1 process x {args.threads} thread(s):   {rate['one process, all threads']:.2f} "
          f"images/s ({best['one process, all threads']:.1f} s)")
    scaling = rate["N workers"] / rate["one worker"]
    print(f"scaling ratio {n} processes / 1: {scaling:.3f} (efficiency {scaling / n:.2f})")
    print(f"{n} processes / 1 process with the same {args.threads} threads: "
          f"{rate['N workers'] / rate['one process, all threads']:.3f}")


if __name__ == "__main__":
    main()
