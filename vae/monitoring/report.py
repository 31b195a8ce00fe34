"""The monitoring report: one self-contained HTML file (plots inlined as PNG data URIs) beside the JSON."""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import numpy as np

from vae.storage import filesystem, is_local, storage_errors, url_of

MAX_DIMENSION_PLOTS = 32


def write_report(root: str | Path, report: dict, arrays: dict, html: bool = True) -> tuple[str, str | None]:
    """report.json + report.html under <root>/<version>-<UTC time>/ (a local path or s3://); returns where
    they are. html=False: the JSON only (the plots take a second or more)."""
    name = f"{report['model_version']}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    fs, base = filesystem(root)
    if is_local(fs):
        json_path, html_path = write_monitoring_report(Path(base) / name, report, **arrays, html=html)
        return str(json_path), str(html_path) if html_path else None
    with tempfile.TemporaryDirectory() as local, storage_errors(str(root)):
        write_monitoring_report(Path(local) / name, report, **arrays, html=html)
        fs.put(str(Path(local) / name), f"{base}/{name}", recursive=True)
    html_url = url_of(fs, f"{base}/{name}/report.html") if html else None
    return url_of(fs, f"{base}/{name}/report.json"), html_url


def write_monitoring_report(
    directory: str | Path,
    report: dict,
    reference: np.ndarray | None,
    new: np.ndarray,
    reference_scores: np.ndarray | None,
    new_scores: np.ndarray,
    movement_distances: np.ndarray | None,
    html: bool = True,
    input_columns: list | None = None,
) -> tuple[Path, Path | None]:
    """Write report.json and (html) report.html into directory; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=_plain))
    if not html:
        return json_path, None
    figures = []
    drift = report.get("drift")
    if drift is not None and reference is not None:
        drifted = set(drift["tests"]["per_dimension"]["drifted_dimensions"])
        figures.append(
            (
                "dimensions",
                "Per-dimension distributions, reference vs new (red title: drifted after Holm)",
                _dimensions(reference, new, drifted),
            )
        )
        mmd = drift["tests"]["mmd"]
        figures.append(
            (
                "mmd-null",
                f"MMD² null distribution ({len(mmd['null'])} permutations) and the observed value",
                _mmd_null(np.asarray(mmd["null"]), mmd["mmd2"], mmd["p_value"]),
            )
        )
    if movement_distances is not None:
        figures.append(
            ("movement", "Per-entity movement after Procrustes alignment", _movement(movement_distances))
        )
    if input_columns:
        caption = "The input columns that moved most: training inputs (reference) vs this batch"
        figures.append(("inputs", caption, _input_columns(input_columns)))
    anomaly = report.get("anomaly") or {}
    figures.append(
        (
            "anomaly-scores",
            "Anomaly scores (negative ELBO, nats) and the version's threshold",
            _scores(reference_scores, new_scores, anomaly.get("threshold")),
        )
    )
    html_path = directory / "report.html"
    html_path.write_text(_page(report, figures))
    return json_path, html_path


def _dimensions(reference: np.ndarray, new: np.ndarray, drifted: set[int]) -> bytes:
    dims = min(reference.shape[1], MAX_DIMENSION_PLOTS)
    columns = min(dims, 4)
    rows = -(-dims // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.2 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= dims:
            axis.axis("off")
            continue
        both = np.concatenate([reference[:, index], new[:, index]])
        bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 40) if np.ptp(both) > 0 else 10
        axis.hist(
            reference[:, index], bins=bins, density=True, alpha=0.5, label="reference", histtype="stepfilled"
        )
        axis.hist(new[:, index], bins=bins, density=True, alpha=0.5, label="new", histtype="stepfilled")
        axis.set_title(f"z{index}", color="tab:red" if index in drifted else "black", fontsize=9)
        axis.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    # fixed margins: tight_layout over 16 small axes costs half a second per report
    figure.subplots_adjust(
        left=0.04,
        right=0.99,
        bottom=0.5 / (2.2 * rows),
        top=1 - 0.35 / (2.2 * rows),
        wspace=0.25,
        hspace=0.55,
    )
    return _png(figure, tight=False)


def _input_columns(columns: list) -> bytes:
    """One panel per column: the key-hash samples' histograms (numeric) or the value shares (categorical)."""
    figure, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3), squeeze=False)
    for axis, (name, reference, batch) in zip(axes.flat, columns, strict=True):
        kind = reference.columns[name].kind
        if kind == "categorical":
            _shares(axis, reference.columns[name], batch.columns[name])
        else:
            before, now = reference.present_sample(name), batch.present_sample(name)
            both = np.concatenate([before, now])
            if len(both) and np.ptp(both) > 0:
                bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 40)
                axis.hist(before, bins=bins, density=True, alpha=0.5, label="training")
                if len(now):
                    axis.hist(now, bins=bins, density=True, alpha=0.5, label="batch")
            if not len(now):
                axis.text(0.5, 0.5, "batch: all missing", ha="center", transform=axis.transAxes)
            axis.legend(fontsize=7)
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
    return _png(figure)


def _shares(axis, trained, seen) -> None:
    values = sorted(
        set(trained.values) | set(seen.values),
        key=lambda v: (
            -max(trained.values.get(v, 0) / max(trained.count, 1), seen.values.get(v, 0) / max(seen.count, 1))
        ),
    )[:8]
    positions = np.arange(len(values))
    for offset, (label, column) in ((-0.2, ("training", trained)), (0.2, ("batch", seen))):
        shares = [column.values.get(v, 0) / max(column.count, 1) for v in values]
        axis.bar(positions + offset, shares, width=0.4, label=label, alpha=0.7)
    axis.set_xticks(positions, [str(v)[:10] for v in values], rotation=45, fontsize=7)
    axis.set_ylabel("share of rows", fontsize=8)
    axis.legend(fontsize=7)


def _mmd_null(null: np.ndarray, observed: float, p_value: float) -> bytes:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(null, bins=30, color="tab:gray", label="permutation null")
    axis.axvline(observed, color="tab:red", label=f"observed {observed:.2e} (p = {p_value:.3f})")
    axis.set(xlabel="block MMD²", ylabel="permutations")
    axis.legend(fontsize=8)
    return _png(figure)


def _movement(distances: np.ndarray) -> bytes:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(distances, bins=40, color="tab:purple")
    axis.axvline(
        float(np.median(distances)), color="black", linestyle="--", label=f"median {np.median(distances):.3f}"
    )
    axis.set(xlabel="distance after alignment (RMS spread = 1)", ylabel="entities")
    axis.legend(fontsize=8)
    return _png(figure)


def _scores(reference: np.ndarray | None, new: np.ndarray, threshold: float | None) -> bytes:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    both = new if reference is None else np.concatenate([reference, new])
    bins = np.linspace(*np.percentile(both, [0.0, 99.9]), 50) if np.ptp(both) > 0 else 10
    if reference is not None:
        axis.hist(reference, bins=bins, density=True, alpha=0.5, label="validation (reference)")
    axis.hist(new, bins=bins, density=True, alpha=0.5, label="new")
    if threshold is not None:
        axis.axvline(threshold, color="tab:red", label=f"threshold {threshold:.1f}")
    axis.set(xlabel="anomaly score (nats)", ylabel="density")
    axis.legend(fontsize=8)
    return _png(figure)


def _png(figure: plt.Figure, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    if tight:
        figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _page(report: dict, figures: list[tuple[str, str, bytes]]) -> str:
    checks = "".join(
        f"<tr class='{'pass' if c['passed'] else 'fail'}'><td>{html.escape(c['name'])}</td>"
        f"<td>{html.escape(c['detail'])}</td><td>{'pass' if c['passed'] else 'FAIL'}</td></tr>"
        for c in report.get("checks", [])
    )
    drift_rows = ""
    if report.get("drift"):
        drift_rows = "".join(
            f"<tr><td>{name}</td><td>{test['p_value']:.4g}</td>"
            f"<td>{html.escape(_effect(name, test))}</td></tr>"
            for name, test in report["drift"]["tests"].items()
        )
    movers = ""
    if report.get("movement"):
        movers = "".join(
            f"<tr><td>{html.escape(str(m['key']))}</td><td>{m['movement']:.3f}</td></tr>"
            for m in report["movement"]["top_movers"]
        )
    plots = "".join(
        f"<figure id='plot-{name}'><img class='plot' alt='{html.escape(caption)}' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode()}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption, png in figures
    )
    sampling = html.escape(report.get("sampling", ""))
    inputs = _inputs_section(report.get("inputs"))
    title = html.escape(f"Latent monitoring: {report.get('model_version', '')}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em
0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} tr.fail td{{background:#fdd}} tr.pass
td{{background:#efe}}
img.plot{{max-width:100%}} figure{{margin:1.5em 0}}</style></head>
<body><h1>{title}</h1>
<p>{html.escape(report.get("verdict", ""))}</p>
<h2>Checks</h2><table><tr><th>check</th><th>value</th><th>result</th></tr>{checks}</table>
<p>{sampling}</p>
{
        "<h2>Drift tests</h2><table><tr><th>test</th><th>p-value</th><th>effect</th></tr>"
        + drift_rows
        + "</table>"
        if drift_rows
        else ""
    }
{"<h2>Top movers</h2><table><tr><th>key</th><th>movement</th></tr>" + movers + "</table>" if movers else ""}
{inputs}
<h2>Plots</h2>{plots}
<script>
// Marks the page once every plot has decoded, for a headless browser to check.
window.addEventListener("load", () => {{
  const shown = [...document.images].filter(img => img.complete && img.naturalWidth > 0).length;
  document.body.setAttribute("data-plots-shown", String(shown));
}});
</script></body></html>
"""


def _inputs_section(inputs: dict | None) -> str:
    """The input columns that moved (ranked), the anomalous rows' surprise per column, or the note."""
    if not inputs:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(c['column'])}</td><td>{html.escape(c['test'])}</td><td>{c['p_value']:.3g}</td>"
        f"<td>{c['effect']:.3f}</td><td>{html.escape(c['phrase'])}</td></tr>"
        for c in inputs.get("columns", [])
    )
    table = (
        "<table><tr><th>column</th><th>test</th><th>adjusted p</th><th>effect</th><th>what moved</th></tr>"
        + rows
        + "</table>"
        if rows
        else ""
    )
    shares = ", ".join(
        f"{html.escape(c)} {s:.0%}" for c, s in (inputs.get("anomaly_attribution") or {}).items()
    )
    surprise = f"<p>Anomalous rows' surprise by column: {shares}</p>" if shares else ""
    note = f"<p>{html.escape(inputs['note'])}</p>" if inputs.get("note") else ""
    summary = f"<p>{html.escape(inputs['summary'])}</p>" if inputs.get("summary") and not rows else ""
    return f"<h2>Inputs</h2>{table}{summary}{note}{surprise}"


def _effect(name: str, test: dict) -> str:
    return {
        "per_dimension": lambda: (
            f"{len(test['drifted_dimensions'])} drifted dimension(s) {test['drifted_dimensions'][:10]}"
        ),
        "mmd": lambda: (
            f"MMD² {test['mmd2']:.3g} (bandwidth {test['bandwidth']:.3g}, {test['blocks']} block(s) of "
            f"{test['block_rows']})"
        ),
        "mean_shift": lambda: (
            f"mean squared standardized difference {test['mean_squared_standardized_difference']:.3g}"
        ),
        "covariance": lambda: f"relative Frobenius distance {test['relative_frobenius_distance']:.3g}",
        "classifier": lambda: f"held-out AUC {test['auc']:.3f}",
    }[name]()


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
