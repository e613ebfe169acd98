"""Does DUDA help? Target-val mIoU of source-only, offline-only and full DUDA over seeds.

For each seed, on the built-in synthetic benchmark (configs/synthetic.yaml by default):

- source-only: the warmup checkpoint, evaluated as trained (source BN statistics), and with
  its BN statistics recomputed on all of target-train (AdaBN: the recalibration the mean
  teacher gets before evaluation);
- offline-only: self-training on the offline pseudo labels alone (source CE + SCE on the
  stored labels, no online labels, no consistency, no in-loop offline update; roughly IAST
  with fixed labels);
- DUDA: full self-training (docs/method.md#self-training), one round, as `duda run` does.

Offline-only and DUDA are evaluated as the config's `evaluate` section says (for the demo: the mean
teacher, BN recalibrated on 20 batches of target-train images). Artifacts go under --out and are
reused when up to date, so an interrupted run continues. Prints one row per seed and the mean, as a
markdown table.

    python benchmarks/method_evidence.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from stages import evaluate, generate_pseudo, prepare_data, self_train, warmup
from stages.config import load_config

OFFLINE_ONLY = ["self_train.loss.consistency=0.0", "self_train.loss.online=0.0",
                "self_train.loss.online_entropy=0.0", "self_train.loss.online_kld=0.0",
                "self_train.offline_start=1000000000"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/method_evidence"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override section.key=value, applied to every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = []
    for seed in args.seeds:
        started = time.monotonic()
        base = [*args.overrides, f"seed={seed}"]
        config = load_config(args.config, base)
        root = args.out / f"seed{seed}"
        data = prepare_data.run(config, args.out / "data").path
        checkpoint = warmup.run(config, data, root / "warmup", device=args.device).path
        pseudo = generate_pseudo.run(config, data, checkpoint, root / "pseudo",
                                     device=args.device).path
        results = {"source-only": checkpoint}
        for name, extra in (("offline-only", OFFLINE_ONLY), ("DUDA", [])):
            variant = load_config(args.config, base + extra)
            results[name] = self_train.run(variant, data, checkpoint, pseudo, root / name,
                                           device=args.device).path
        row = {"seed": seed}
        plain = load_config(args.config, base + ["evaluate.recalibration.enabled=false"])
        adabn = load_config(args.config, base + ["evaluate.recalibration.enabled=true",
                                                 "evaluate.recalibration.batches=0"])
        evaluations = [(name, path, config) for name, path in results.items()]
        evaluations[0] = ("source-only", checkpoint, plain)
        evaluations.insert(1, ("source-only + AdaBN", checkpoint, adabn))
        for name, path, settings in evaluations:
            report = evaluate.run(settings, data, path, root / f"evaluate-{name}",
                                  device=args.device)
            row[name] = 100 * report.manifest.summary["miou"]
        row["minutes"] = (time.monotonic() - started) / 60
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    names = ["source-only", "source-only + AdaBN", "offline-only", "DUDA"]
    print(f"| seed | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for row in rows:
        print(f"| {row['seed']} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
    means = [statistics.mean(row[n] for row in rows) for n in names]
    print("| mean | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    print(f"\nDUDA − source-only: {means[3] - means[0]:+.1f} mIoU; "
          f"DUDA − source-only + AdaBN: {means[3] - means[1]:+.1f} mIoU; "
          f"DUDA − offline-only: {means[3] - means[2]:+.1f} mIoU")


if __name__ == "__main__":
    main()
