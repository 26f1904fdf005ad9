"""Summarize a multirun: a table of its jobs (overrides and final metrics, best first), the failed
jobs, and a PNG of the optimized metric against each swept parameter.

    python scripts/summarize.py logs/<task_name>/multiruns/<timestamp>
    python scripts/summarize.py <sweep dir> --metric test/acc --mode max --png /tmp/sweep.png

Reads each job folder's metrics.json (written by train(), also for failed jobs: status failed and
the error); a job folder without one (killed before it could write) counts as failed. The
optimized metric and its direction come from the jobs' metrics.json and the sweep's
multirun.yaml (Optuna's hydra.sweeper.direction); else names with loss/mse/error are minimized.
Swept parameters are the overrides whose values differ between jobs. The PNG goes to
<sweep dir>/summary.png by default. Exit status 0 when at least one job succeeded, else 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def _parse_value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _overrides(job_dir: Path, report: dict) -> dict[str, str]:
    items = report.get("overrides")
    if not items:
        saved = job_dir / ".hydra" / "overrides.yaml"
        if saved.is_file():
            import yaml

            items = yaml.safe_load(saved.read_text()) or []
    out = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One entry per job folder (a folder holding metrics.json or .hydra/), sorted by job number."""
    folders = {p.parent for p in sweep_dir.rglob("metrics.json")} | {p.parent for p in sweep_dir.rglob(".hydra")}
    hidden = {f for f in folders if any(part.startswith(".") for part in f.relative_to(sweep_dir).parts)}
    folders = folders - hidden - {sweep_dir}
    jobs = []
    for folder in folders:
        path = folder / "metrics.json"
        if path.is_file():
            try:
                report = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                report = {"status": "failed", "error": f"unreadable metrics.json: {err}"}
        else:
            report = {"status": "failed", "error": "no metrics.json (the job was killed or never started)"}
        report.setdefault("status", "ok")
        jobs.append({"job": str(folder.relative_to(sweep_dir)), "dir": folder, "report": report,
                     "overrides": _overrides(folder, report)})
    return sorted(jobs, key=lambda j: [int(p) if p.isdigit() else p for p in Path(j["job"]).parts])


def _direction(sweep_dir: Path, metric: str | None) -> str:
    multirun = sweep_dir / "multirun.yaml"
    if multirun.is_file():
        import yaml

        cfg = yaml.safe_load(multirun.read_text()) or {}
        direction = (((cfg.get("hydra") or {}).get("sweeper") or {}).get("direction"))
        if isinstance(direction, str) and direction in ("minimize", "maximize"):
            return "min" if direction == "minimize" else "max"
    if metric and any(word in metric.lower() for word in ("loss", "mse", "error", "mae")):
        return "min"
    return "max"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def plot(ok: list[dict], swept: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(swept))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, key in zip(axes[0], swept or [None]):
        ys = [j["value"] for j in ok]
        if key is None:
            ax.plot(range(len(ys)), ys, "o")
            ax.set_xlabel("job")
        else:
            raw = [_parse_value(j["overrides"].get(key, "")) for j in ok]
            if all(isinstance(v, (int, float)) for v in raw):
                ax.plot(raw, ys, "o")
                positive = [v for v in raw if v > 0]
                if len(positive) == len(raw) and max(raw) / min(raw) >= 20:
                    ax.set_xscale("log")  # learning rates and the like
            else:
                labels = sorted({str(v) for v in raw})
                ax.plot([labels.index(str(v)) for v in raw], ys, "o")
                ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per job ({len(ok)} succeeded)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(sweep_dir: Path, metric: str | None = None, mode: str | None = None, png: Path | None = None,
              out=sys.stdout) -> dict[str, Any]:
    """Print the table and failures, draw the PNG; return {'jobs', 'ok', 'failed', 'metric', 'mode', 'png'}."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"summarize: {sweep_dir} is not a folder (expected logs/<task>/multiruns/<timestamp>)")
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"summarize: no job folders with metrics.json under {sweep_dir}")
    declared = (j["report"].get("optimized_metric") for j in jobs if j["report"].get("optimized_metric"))
    metric = metric or next(declared, None)
    mode = mode or _direction(sweep_dir, metric)

    keys = sorted({k for j in jobs for k in j["overrides"]})
    swept = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    ok, failed = [], []
    for j in jobs:
        value = j["report"].get("metrics", {}).get(metric) if metric else None
        if j["report"]["status"] == "ok" and isinstance(value, (int, float)) and math.isfinite(value):
            ok.append({**j, "value": float(value)})
        else:
            if j["report"]["status"] == "ok":
                j["report"]["error"] = f"{metric} = {value} (not a finite number)"
            failed.append(j)
    ok.sort(key=lambda j: j["value"], reverse=mode == "max")

    finals = sorted({k for j in ok for k in j["report"].get("metrics", {}) if k.startswith("test/")})
    header = ["rank", "job", *swept, f"{metric} ({mode})", *[k for k in finals if k != metric]]
    rows = [[str(i + 1), j["job"], *[j["overrides"].get(k, "") for k in swept], _fmt(j["value"]),
             *[_fmt(j["report"]["metrics"].get(k)) for k in finals if k != metric]] for i, j in enumerate(ok)]
    print(f"Sweep {sweep_dir}: {len(jobs)} jobs, {len(ok)} succeeded, {len(failed)} failed; "
          f"swept: {', '.join(swept) or 'nothing'}", file=out)
    if rows:
        print(_table(header, rows), file=out)
    if failed:
        print("\nFailed jobs:", file=out)
        for j in failed:
            args = " ".join(f"{k}={j['overrides'][k]}" for k in swept if k in j["overrides"]) or "-"
            error = str(j["report"].get("error", "")).strip().splitlines()
            kind = j["report"].get("error_type") or j["report"]["status"]
            print(f"  job {j['job']} ({args}): {kind}: {error[0] if error else ''}", file=out)
    png_path = None
    if ok and metric:
        png_path = Path(png) if png else sweep_dir / "summary.png"
        plot(ok, swept, metric, png_path)
        print(f"\nPlot: {png_path}", file=out)
    return {"jobs": jobs, "ok": ok, "failed": failed, "metric": metric, "mode": mode, "png": png_path}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder: logs/<task_name>/multiruns/<timestamp>")
    parser.add_argument("--metric", help="the metric to rank by (default: the jobs' optimized_metric)")
    parser.add_argument("--mode", choices=["min", "max"],
                        help="best is the lowest or highest (default: from the sweep)")
    parser.add_argument("--png", type=Path, help="where to draw the plot (default: <sweep dir>/summary.png)")
    args = parser.parse_args(argv)
    try:
        result = summarize(args.sweep_dir, args.metric, args.mode, args.png)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
