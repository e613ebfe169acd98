"""The `report` stage: figures and tables from artifacts on disk, in one self-contained page.

It reads checkpoint artifacts (their `metrics.jsonl`), training runs still in progress (a
folder with `metrics.jsonl` and no manifest yet: a live run is drawn as far as it has logged,
under a banner) and evaluation artifacts (`report.json` and the saved prediction panels); it
never runs a model. Training curves are grouped by metrics key (losses, periodic evaluation,
pseudo-label coverage and accuracy, offline update, schedules, then any other key, so a newly
logged key appears without a code change), one line per run; per-class lists become heat maps
over iterations. An evaluation gives per-class IoU bars, its row-normalised confusion matrix and
a few prediction panels; evaluations are compared class by class in `comparison.md` and
`comparison.csv`. The output is a `duda.report` artifact: the PNGs, the tables and
`index.html` with every image embedded as a data URI (no network, no external files).

Inputs that cannot be drawn are listed and skipped; only when nothing can be drawn is it an
error. The report is derived data: an existing report whose inputs changed (a live run logged
more) is rebuilt without `--force`; one whose inputs are the same is a no-op.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages.artifacts.manifest import (
    MANIFEST,
    REPORT,
    ArtifactRef,
    StageResult,
    atomic_write_text,
    read_manifest,
)
from stages.artifacts.writer import ArtifactWriter
from stages.config import config_hash
from stages.data.io import open_image
from stages.figures import plots
from stages.figures.inputs import (
    DRAWABLE,
    Evaluation,
    Skipped,
    Training,
    class_series,
    curve_group,
    curve_groups,
    open_artifacts,
    scalar_series,
    short_names,
)
from stages.method.offline import CHANGES, complete_changes
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter

HTML_FILE = "index.html"
COMPARISON_MD = "comparison.md"
COMPARISON_CSV = "comparison.csv"
PANEL_WIDTH = 1024  # wider panels are scaled down to this many pixels

logger = logging.getLogger("duda")


# ------------------------------------------------------------------------------ the stage


def run(paths: Sequence[str | Path], out: str | Path, *, force: bool = False,
        reporter: Reporter | None = None) -> StageResult:
    """Draw `paths` (checkpoints, evaluations, runs in progress) into the report at `out`."""
    plots.require_matplotlib()
    reporter = reporter or Reporter()
    out = Path(out)
    if not paths:
        raise DudaError("no artifact to draw", f"pass one or more of: {DRAWABLE}")
    given = list({Path(p).resolve(): Path(p) for p in paths}.values())  # each path once
    opened = [item for path, name in zip(given, short_names(given)) for item in open_artifacts(path, name)]
    skipped = [item for item in opened if isinstance(item, Skipped)]
    runs = [item for item in opened if isinstance(item, Training)]
    evaluations = [item for item in opened if isinstance(item, Evaluation)]
    if not runs and not evaluations:
        reasons = "; ".join(f"{item.path} {item.reason}" for item in skipped)
        raise DudaError(f"nothing to draw: {reasons}", skipped[0].fix)
    for item in skipped:
        reporter.info(f"skipped {item.path}: {item.reason}")
    for training in runs:
        if training.manifest is None or training.notes:
            reporter.info(f"{training.name}: {'; '.join([training.state, *training.notes])}")

    inputs = {item.name: item.ref for item in [*runs, *evaluations]}
    section = {"paths": [str(path.resolve()) for path in given]}
    digest = config_hash(section)
    force = force or _replaceable(out, digest, inputs)
    with ArtifactWriter(out, kind=REPORT, stage="report", config=section, config_hash=digest,
                        inputs=inputs, protect=given, force=force) as writer:
        if writer.up_to_date:
            return writer.result()
        page = _Page(writer.work)
        _draw_runs(page, runs)
        _draw_evaluations(page, evaluations)
        tables = _write_comparison(page, evaluations) if evaluations else []
        atomic_write_text(writer.work / HTML_FILE, page.html(runs, evaluations, skipped))
        summary = {
            "html": HTML_FILE,
            "figures": page.figures,
            "tables": tables,
            "runs": {t.name: {"path": str(t.folder.resolve()), "finished": t.manifest is not None,
                              "last_iteration": t.metrics.last_iteration,
                              "total_iterations": t.total,
                              "skipped_lines": t.metrics.skipped} for t in runs},
            "evaluations": {e.name: {"path": str(e.path.resolve()), "miou": e.report["miou"]}
                            for e in evaluations},
            "skipped": [{"path": str(item.path), "reason": item.reason} for item in skipped],
        }
        writer.finish(summary, content=[*page.figures, *tables, HTML_FILE])
    return writer.result()


def _replaceable(out: Path, digest: str, inputs: dict[str, ArtifactRef]) -> bool:
    """Whether `out` holds a report of other inputs, to be rebuilt without --force (a report
    is derived from its inputs: replacing it loses nothing). Another kind is refused."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out)
    except DudaError:
        return False  # the writer reports the damage
    if manifest.kind != REPORT:
        raise DudaError(f"--out {out} holds a {manifest.kind} artifact",
                        "write the report to a folder of its own (another --out)")
    return (manifest.config_hash != digest
            or {k: v.id for k, v in manifest.inputs.items()} != {k: v.id for k, v in
                                                                   inputs.items()})


# ------------------------------------------------------------------------------ drawing


class _Page:
    """The figures written so far and the HTML sections that show them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.figures: list[str] = []
        self.run_figures: list[str] = []  # HTML of the training figures
        self.evaluation_html: dict[str, list[str]] = {}
        self.comparison_html: list[str] = []

    def name(self, *words: str) -> str:
        """A new figure file name made of `words`."""
        stem = "-".join(_slug(word) for word in words)
        name, n = f"{stem}.png", 1
        while name in self.figures:
            n += 1
            name = f"{stem}-{n}.png"
        self.figures.append(name)
        return name

    def figure(self, name: str, caption: str) -> str:
        data = base64.b64encode((self.folder / name).read_bytes()).decode()
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>")

    def html(self, runs: list[Training], evaluations: list[Evaluation],
             skipped: list[Skipped]) -> str:
        body = ["<h1>duda report</h1>"]
        for training in runs:  # what someone watching a live run looks for first
            if training.manifest is None:
                body.append(f'<div class="banner live">{_e(training.name)}: '
                            f"{_e(training.state)}</div>")
            body.extend(f'<div class="banner">{_e(training.name)}: {_e(note)}</div>'
                        for note in training.notes)
        body.append(_inputs_table(runs, evaluations))
        if skipped:
            body.append('<div class="banner"><strong>Skipped</strong><ul>' + "".join(
                f"<li><code>{_e(str(s.path))}</code> {_e(s.reason)} (fix: {_e(s.fix)})</li>"
                for s in skipped) + "</ul></div>")
        if runs:
            body.append("<h2>Training</h2>")
            body.extend(self.run_figures)
            for training in runs:
                body.append(_run_section(training))
        if evaluations:
            body.append("<h2>Evaluations</h2>")
            for evaluation in evaluations:
                body.extend(self.evaluation_html[evaluation.name])
            body.extend(self.comparison_html)
        return _document("duda report", "\n".join(body))


def _draw_runs(page: _Page, runs: list[Training]) -> None:
    if not runs:
        return
    overlaid = len(runs) > 1
    suffix = "" if overlaid else f" — {runs[0].name}"
    per_run = {t.name: scalar_series(t.metrics.records) for t in runs}
    keys = list(dict.fromkeys(key for series in per_run.values() for key in series))
    if keys:
        page.run_figures.append("<h3>Training curves</h3>")
    for group, title in curve_groups(CHANGES):
        panels = {key: {name: series[key] for name, series in per_run.items() if key in series}
                  for key in keys if curve_group(key, CHANGES) == group}
        if not panels:
            continue
        name = page.name("curves", group)
        plots.small_multiples(panels, page.folder / name, title=title + suffix)
        page.run_figures.append(page.figure(name, title + (
            " (one line per run)" if overlaid else "")))
    per_class = {t.name: class_series(t.metrics.records) for t in runs}
    class_keys = list(dict.fromkeys(key for series in per_class.values() for key in series))
    if class_keys:
        page.run_figures.append("<h3>Per class</h3>")
    for key in class_keys:
        # Runs with the same class list share a figure (one heat map each); others get theirs.
        by_classes: dict[tuple[str, ...], dict[str, tuple[list[float], np.ndarray]]] = {}
        for training in runs:
            if key in per_class[training.name]:
                iterations, values = per_class[training.name][key]
                labels = _row_labels(training.class_names, values.shape[1])
                by_classes.setdefault(labels, {})[training.name] = (iterations, values)
        for labels, panels in by_classes.items():
            finite = np.concatenate([v[np.isfinite(v)] for _, v in panels.values()])
            unit = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
            name = page.name("classes", key)
            plots.timeline_heatmaps(panels, page.folder / name, row_labels=list(labels),
                                    title=key + suffix, vmin=0 if unit else None,
                                    vmax=1 if unit else None, colorbar_label=key)
            page.run_figures.append(page.figure(
                name, f"{key} per class over iterations (grey: undefined)"))


def _row_labels(names: list[str] | None, count: int) -> tuple[str, ...]:
    if names is not None and len(names) == count:
        return tuple(names)
    return tuple(f"class {c}" for c in range(count))


def _draw_evaluations(page: _Page, evaluations: list[Evaluation]) -> None:
    for evaluation in evaluations:
        section = [f"<h3>{_e(evaluation.name)}</h3>",
                   (f"<p><strong>{_e(evaluation.headline)}</strong><br>"
                    f"<code>{_e(str(evaluation.path.resolve()))}</code></p>")]
        classes = evaluation.protocol_classes
        per_class = evaluation.report["per_class"]
        name = page.name(evaluation.name, "iou")
        plots.bars_figure({evaluation.name: {c: _percent(per_class.get(c)) for c in classes}},
                          page.folder / name, title=f"{evaluation.name}: IoU per class",
                          ylabel="IoU %", ylim=(0, 105))
        section.append(page.figure(name, "IoU per class (%)"))
        confusion = _confusion(evaluation)
        if confusion is not None:
            matrix, rows, columns = confusion
            name = page.name(evaluation.name, "confusion")
            plots.heatmap_figure(matrix, page.folder / name, row_labels=rows,
                                 column_labels=columns, title=f"{evaluation.name}: confusion",
                                 xlabel="prediction", ylabel="ground truth", vmin=0, vmax=1,
                                 colorbar_label="share of the ground-truth row", percent=True)
            section.append(page.figure(name, "confusion matrix, each ground-truth row "
                                       "normalised to 1 (cells in %; grey: class absent)"))
        for source in evaluation.predictions:
            name = page.name(evaluation.name, "prediction", source.stem)
            _copy_scaled(source, page.folder / name)
            section.append(page.figure(name, f"{source.stem}: {evaluation.prediction_caption}"))
        page.evaluation_html[evaluation.name] = section


def _confusion(evaluation: Evaluation) -> tuple[np.ndarray, list[str], list[str]] | None:
    """The confusion matrix over the protocol's classes, rows normalised by their ground-truth
    pixels; predictions of classes outside the protocol are summed in an "other" column."""
    matrix = np.asarray(evaluation.report.get("confusion_matrix") or [], dtype=float)
    names = evaluation.class_names
    if matrix.ndim != 2 or matrix.shape != (len(names), len(names)):
        return None
    keep = [names.index(c) for c in evaluation.protocol_classes if c in names]
    totals = matrix[keep].sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = matrix[keep] / totals  # (K, C); a class absent from ground truth is NaN
    columns = [names[c] for c in keep]
    table = shares[:, keep]
    rest = np.nansum(shares, axis=1) - np.nansum(table, axis=1)
    if np.any(rest > 0):
        table = np.concatenate([table, np.where(totals > 0, rest[:, None], np.nan)], axis=1)
        columns.append("other classes")
    return table, [names[c] for c in keep], columns


def _copy_scaled(source: Path, target: Path) -> None:
    fix = "rerun the evaluation that wrote it (`duda evaluate --force`), or leave it out"
    with open_image(source, fix) as image:
        image = image.convert("RGB")
        if image.width > PANEL_WIDTH:
            height = round(image.height * PANEL_WIDTH / image.width)
            image = image.resize((PANEL_WIDTH, height), Image.Resampling.LANCZOS)
        image.save(target, format="PNG")


# ------------------------------------------------------------------------------ comparison


def comparison_rows(evaluations: Sequence[Evaluation]) -> list[tuple[str, list[float | None]]]:
    """(row label, IoU per evaluation) for every class any evaluation's mIoU averages, then
    "mIoU" (each evaluation's headline), then "mIoU-<protocol>" rows where evaluations report
    more than one protocol or different ones. None where an evaluation has no value."""
    classes = list(dict.fromkeys(c for e in evaluations for c in e.protocol_classes))
    rows = [(c, [e.report["per_class"].get(c) if c in e.protocol_classes else None
                 for e in evaluations]) for c in classes]
    rows.append(("mIoU", [e.report["miou"] for e in evaluations]))
    protocols = [dict(e.report.get("miou_by_protocol", {})) for e in evaluations]
    names = list(dict.fromkeys(p for by in protocols for p in by))
    if len(names) > 1:
        for protocol in sorted(names, key=lambda p: (-int(p) if p.isdigit() else 0, p)):
            rows.append((f"mIoU-{protocol}", [by.get(protocol) for by in protocols]))
    return rows


def _write_comparison(page: _Page, evaluations: list[Evaluation]) -> list[str]:
    rows = comparison_rows(evaluations)
    columns = [e.name for e in evaluations]
    cells = [(label, [None if v is None else 100 * float(v) for v in values])
             for label, values in rows]

    lines = ["| class | " + " | ".join(_md(c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, values in cells:
        best = max((v for v in values if v is not None), default=None)
        text = [("–" if v is None else (f"**{v:.1f}**" if len(values) > 1 and v == best
                                        else f"{v:.1f}")) for v in values]
        lines.append(f"| {_md(label)} | " + " | ".join(text) + " |")
    legend = [f"- {_md(e.name)}: {_md(e.headline)}" for e in evaluations]
    atomic_write_text(page.folder / COMPARISON_MD,
                      "IoU per class and mIoU, in %"
                      + (" (best of each row in bold)" if len(columns) > 1 else "")
                      + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(legend) + "\n")

    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerow(["class", *columns])
    for label, values in cells:
        table.writerow([label, *("" if v is None else f"{v:.2f}" for v in values)])
    atomic_write_text(page.folder / COMPARISON_CSV, buffer.getvalue())

    html_rows = "".join(
        ('<tr class="total">' if label.startswith("mIoU") else "<tr>") + f"<th>{_e(label)}</th>"
        + "".join("<td>–</td>" if v is None else f"<td>{v:.1f}</td>" for v in values) + "</tr>"
        for label, values in cells)
    page.comparison_html = [
        "<h2>Comparison</h2>" if len(columns) > 1 else "<h2>Table</h2>",
        ("<p>IoU per class and mIoU in %; also in <code>comparison.md</code> and "
         "<code>comparison.csv</code>.</p>"),
        "<table><thead><tr><th>class</th>" + "".join(f"<th>{_e(c)}</th>" for c in columns)
        + f"</tr></thead><tbody>{html_rows}</tbody></table>"]
    if len(columns) > 1:
        name = page.name("comparison", "iou")
        plots.bars_figure({e.name: {label: values[i] for label, values in cells
                                    if not label.startswith("mIoU-")}
                           for i, e in enumerate(evaluations)},
                          page.folder / name, title="IoU per class", ylabel="IoU %",
                          ylim=(0, 105))
        page.comparison_html.append(page.figure(name, "IoU per class and mIoU (%)"))
    return [COMPARISON_MD, COMPARISON_CSV]


# ------------------------------------------------------------------------------ HTML


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td.text { text-align: left; } tr.total { font-weight: bold; background: #f2f2f2; }
.banner { background: #fff3cd; border: 1px solid #d9b44a; padding: 0.5em 1em; margin: 0.5em 0; }
.banner.live { background: #fde2e1; border-color: #d9534f; font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } code { font-size: 0.9em; }
.live { color: #b02a25; font-weight: bold; }
ul.figures { columns: 3; list-style: none; padding: 0; font-size: 0.9em; }
"""


def _document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
            "</body>\n</html>\n")


def _inputs_table(runs: list[Training], evaluations: list[Evaluation]) -> str:
    rows = [(t.manifest is None, t.name, t.state, str(t.folder.resolve()), t.ref.id)
            for t in runs]
    rows += [(False, e.name, f"evaluation: {e.headline}", str(e.path.resolve()),
              e.manifest.id) for e in evaluations]
    return ("<table><thead><tr><th>name</th><th>what</th><th>path</th><th>id</th></tr></thead>"
            "<tbody>" + "".join(('<tr class="live">' if live else "<tr>") + "".join(
                f'<td class="text">{_e(cell)}</td>' for cell in cells) + "</tr>"
                for live, *cells in rows) + "</tbody></table>")


def _run_section(training: Training) -> str:
    live = training.manifest is None
    parts = [f"<h3>{_e(training.name)}</h3>",
             ('<p class="live">' if live else "<p>") + f"{_e(training.state)}<br>"
             f"<code>{_e(str(training.folder.resolve()))}</code></p>"]
    parts.extend(f"<p>{_e(note)}</p>" for note in training.notes)
    figures = _summary_figures(training.manifest.summary if training.manifest else {},
                               f"checkpoint {training.path}")
    if figures:
        parts.append('<ul class="figures">' + "".join(
            f"<li><strong>{_e(key)}</strong> {_e(value)}</li>" for key, value in figures)
            + "</ul>")
    return "\n".join(parts)


def _summary_figures(summary: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """The manifest's headline figures, nested dicts flattened one level, digests left out.
    A self-train run's offline change counts show every category of `CHANGES`: one its
    version did not count yet shows 0."""
    flat: list[tuple[str, Any]] = []
    if "offline_changes" in summary:
        summary = {**summary, "offline_changes": complete_changes(
            summary["offline_changes"], 0, where)}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.extend((f"{key}/{k}", v) for k, v in value.items())
        else:
            flat.append((key, value))
    return [(key, f"{value:.4g}" if isinstance(value, float) else str(value))
            for key, value in flat if "digest" not in key
            and (value is None or isinstance(value, (str, int, float)))]


# ------------------------------------------------------------------------------ helpers




def _percent(value: Any) -> float | None:
    return None if value is None else 100 * float(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"




def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _md(text: str) -> str:
    """`text` as literal Markdown table text: HTML as entities (a Markdown viewer renders raw
    HTML, as a browser would in index.html), emphasis, link and table characters escaped."""
    text = html.escape(" ".join(text.split()), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)
