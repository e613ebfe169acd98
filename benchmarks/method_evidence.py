"""Does DUDA help, and does each of its mechanisms? The ablation table on a built-in domain pair.

Target-val mIoU over seeds, on `--pair hard` (configs/synthetic_hard.yaml), `--pair easy`
(configs/synthetic.yaml) or `--pair mit` (configs/synthetic_mit.yaml: the easy pair's data with
a MiT-B0 and DAFormer's head and optimizer), of these rows:

- source-only: the warmup model as trained (its source BN statistics);
- AdaBN: the same model, its BN statistics recomputed on all of target-train (for a MiT, the
  head's BN only: the encoder has LayerNorm);
- plain mean teacher: the teacher's online labels alone, by cross-entropy at weight 1 (DAFormer's
  self-training without its extras): no stored labels, no offline update, no consistency, no
  regularisers;
- offline-only: self-training on the stored labels alone (source CE + SCE on the offline labels;
  no online labels, no consistency, no offline update: `offline_start` past the end);
- online-only: the mean teacher's online labels and consistency, no stored labels
  (`loss.offline=0`) and no offline update;
- no offline update: DUDA with the stored labels never updated (`self_train.offline_update`);
- CE, not SCE: DUDA with plain cross-entropy on the stored labels (`offline_sce_a=1`,
  `offline_sce_b=0`);
- DUDA: the full method, one round, as `duda run` runs it;
- ceiling: the offline-only row's schedule fed target-train ground truth as its stored labels
  (imported as `duda pseudo import` does): what any labels can reach in that schedule;
- oracle: the same model trained on target-train labels (`warmup.train_domain=target`).

Every self-training row starts from the same warmup checkpoint and the same stored labels and is
scored as the config's `evaluate` section says (the mean teacher, BN recalibrated on target-train
crops). Prints one markdown table (every seed, mean ± standard deviation), the labels'
accuracy and coverage over the run, and the wall time; writes `results.json` under --out and,
with --plot, a figure of target-val mIoU and online/offline label accuracy over the iterations.
Artifacts are reused when up to date, so an interrupted run continues.

    python benchmarks/method_evidence.py --pair hard --seeds 0 1 2 --plot docs/images/evidence.png
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages import evaluate, generate_pseudo, prepare_data, pseudo, self_train, warmup
from stages.artifacts.checkpoint import METRICS_FILE
from stages.config import load_config
from stages.data.index import load_dataset_index

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"easy": ROOT / "configs" / "synthetic.yaml",
         "hard": ROOT / "configs" / "synthetic_hard.yaml",
         "mit": ROOT / "configs" / "synthetic_mit.yaml"}
NEVER = "self_train.offline_start=1000000000"
# Each self-training row: its overrides of the config (the rest is the config's DUDA).
OFFLINE_ONLY = ["self_train.loss.consistency=0.0", "self_train.loss.online=0.0",
                "self_train.loss.online_entropy=0.0", "self_train.loss.online_kld=0.0", NEVER]
SELF_TRAINING = {
    "plain mean teacher": ["self_train.loss.offline=0.0", "self_train.loss.consistency=0.0",
                           "self_train.loss.online=1.0", "self_train.loss.online_entropy=0.0",
                           "self_train.loss.online_kld=0.0", "self_train.loss.offline_entropy=0.0",
                           "self_train.loss.offline_kld=0.0", "self_train.offline_update=false"],
    "offline-only": OFFLINE_ONLY,
    "online-only": ["self_train.loss.offline=0.0", "self_train.offline_update=false"],
    "no offline update": ["self_train.offline_update=false"],
    "CE, not SCE": ["self_train.loss.offline_sce_a=1.0", "self_train.loss.offline_sce_b=0.0"],
    "DUDA": [],
    # the offline-only schedule on a store holding target-train ground truth
    "ceiling": OFFLINE_ONLY,
}
ROWS = ["source-only", "AdaBN", *SELF_TRAINING, "oracle"]
CURVES = ("val/miou", "online/label_accuracy", "offline/label_accuracy",
          "online/label_coverage", "offline/label_coverage")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="hard")
    parser.add_argument("--config", type=Path, help="instead of the pair's config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="default: runs/method_evidence/<pair>")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override section.key=value, applied to every run")
    parser.add_argument("--plot", type=Path, help="write the curves figure here (PNG)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="ROW",
                        help=f"only these rows (default: all of {', '.join(ROWS)})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config_path = args.config or PAIRS[args.pair]
    out = args.out or ROOT / "runs" / "method_evidence" / args.pair
    started = time.monotonic()
    rows = [row for row in ROWS if row in args.rows]
    results: dict[str, Any] = {"config": str(config_path), "overrides": args.overrides,
                               "rows": rows, "seeds": {}}
    for seed in args.seeds:
        results["seeds"][str(seed)] = run_seed(config_path, [*args.overrides, f"seed={seed}"],
                                               out / f"seed{seed}", out / "data", args.device,
                                               rows)
        print(json.dumps({"seed": seed, **{row: results["seeds"][str(seed)][row]["miou"]
                                           for row in rows}}), file=sys.stderr, flush=True)
    results["minutes"] = (time.monotonic() - started) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print()
    print(label_table(results))
    print(f"\nwall time: {results['minutes']:.1f} minutes for {len(args.seeds)} seed(s)")
    if args.plot:
        plot(results, args.plot)
        print(f"figure: {args.plot}")


def run_seed(config_path: Path, base: list[str], root: Path, data_dir: Path,
             device: str, rows: list[str]) -> dict[str, dict[str, Any]]:
    """The rows for one seed: {row: {"miou", "curves"}}."""

    def config(*extra: str):
        return load_config(config_path, [*base, *extra])

    data = prepare_data.run(config(), data_dir).path
    source = warmup.run(config(), data, root / "warmup", device=device).path
    as_trained = ("evaluate.recalibration.enabled=false",)
    adabn = ("evaluate.recalibration.enabled=true", "evaluate.recalibration.batches=0")
    scored = {"source-only": (source, config(*as_trained)), "AdaBN": (source, config(*adabn))}
    if "oracle" in rows:
        scored["oracle"] = (warmup.run(config("warmup.train_domain=target"), data,
                                       root / "oracle", device=device).path, config(*as_trained))
    training = [name for name in SELF_TRAINING if name in rows]
    stores = {}
    if any(name != "ceiling" for name in training):
        stores["labels"] = generate_pseudo.run(config(), data, source, root / "pseudo",
                                               device=device).path
    if "ceiling" in training:
        stores["truth"] = ground_truth_store(data, root)
    for name in training:
        store = stores["truth" if name == "ceiling" else "labels"]
        run = self_train.run(config(*SELF_TRAINING[name]), data, source, store,
                             root / _folder(name), device=device).path
        scored[name] = (run, config())
    found = {}
    for name in rows:
        checkpoint, settings = scored[name]
        report = evaluate.run(settings, data, checkpoint, root / f"evaluate-{_folder(name)}",
                              device=device)
        found[name] = {"miou": 100 * report.manifest.summary["miou"],
                       "curves": curves(checkpoint / METRICS_FILE) if name in SELF_TRAINING
                       else {}}
    return found


def ground_truth_store(data: Path, root: Path) -> Path:
    """A store of target-train ground truth, imported from one label PNG per image as
    `duda pseudo import` does (confidence 1 everywhere labelled)."""
    folder = root / "target-train-labels"
    folder.mkdir(parents=True, exist_ok=True)
    for sample in load_dataset_index(data).samples("target", "train"):
        path = folder / f"{sample.id}.png"
        if not path.exists():
            Image.fromarray(np.ascontiguousarray(sample.read_label())).save(path)
    return pseudo.run(folder, data, root / "ground-truth").path


def _folder(row: str) -> str:
    return row.lower().replace(",", "").replace(" ", "-")


def curves(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """(iteration, value) of each key in CURVES that a run logged."""
    found: dict[str, list[tuple[int, float]]] = {key: [] for key in CURVES}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        for key in CURVES:
            if record.get(key) is not None:
                found[key].append((record["iteration"], record[key]))
    return {key: points for key, points in found.items() if points}


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def table(results: dict[str, Any]) -> str:
    """Rows × seeds of target-val mIoU, with the mean ± sample standard deviation."""
    seeds = list(results["seeds"])
    lines = ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---" * (len(seeds) + 2) + "|"]
    for row in results["rows"]:
        values = [results["seeds"][s][row]["miou"] for s in seeds]
        lines.append(f"| {row} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {_spread(values)} |")
    return "\n".join(lines)


def label_table(results: dict[str, Any]) -> str:
    """First and last logged accuracy and coverage of the online and offline labels trained on
    (% of ground-truth pixels, mean over the seeds), per self-training row."""
    seeds = list(results["seeds"])
    keys = [f"{kind}/label_{what}" for kind in ("online", "offline")
            for what in ("accuracy", "coverage")]
    lines = ["| row | " + " | ".join(f"{key} first → last" for key in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for row in [row for row in SELF_TRAINING if row in results["rows"]]:
        cells = []
        for key in keys:
            runs = [results["seeds"][s][row]["curves"].get(key) for s in seeds]
            if not all(runs):
                cells.append("–")
                continue
            first = statistics.fmean(100 * run[0][1] for run in runs)
            last = statistics.fmean(100 * run[-1][1] for run in runs)
            cells.append(f"{first:.1f} → {last:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Target-val mIoU and online/offline label accuracy over the iterations, the mean over the
    seeds per self-training row (the rows that logged the key)."""
    from stages.figures.plots import small_multiples

    seeds = list(results["seeds"])
    panels: dict[str, dict[str, list[tuple[float, float | None]]]] = {}
    for key, title in (("val/miou", "target-val mIoU (%)"),
                       ("online/label_accuracy", "online label accuracy (%)"),
                       ("offline/label_accuracy", "offline label accuracy (%)"),
                       ("offline/label_coverage", "offline label coverage (%)")):
        for row in [row for row in SELF_TRAINING if row in results["rows"]]:
            runs = [results["seeds"][s][row]["curves"].get(key) for s in seeds]
            if not all(runs):
                continue
            steps = [step for step, _ in runs[0]]
            panels.setdefault(title, {})[row] = [
                (step, 100 * statistics.fmean(run[i][1] for run in runs))
                for i, step in enumerate(steps) if all(len(run) > i for run in runs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    small_multiples(panels, path, columns=2,
                    title=f"self-training rows, mean of seeds {', '.join(seeds)}")


if __name__ == "__main__":
    main()
