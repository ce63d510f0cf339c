"""One self-contained HTML page for a run directory: scores, selection, validation, comparison, costs.

`write(run_dir)` reads whichever artifacts the run holds and writes `run_dir/report.html`. Every
plot is an inline base64 PNG and the only styling is an inline <style>, so the file can be mailed,
attached to an issue or opened offline. A section whose artifact is missing says which command
writes it instead of failing, so the report works at any point of a run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradex.atomic import write_bytes
from gradex.config import ConfigError
from gradex.stability import FLIPS, STABLE, stability_lines
from gradex.comparison import SELECTED, shown
from gradex.comparison import fmt_interval as interval_text
from gradex.comparison import fmt_number as num

__all__ = ["write", "score_errors"]

# Methods whose estimates.parquet rows are many sampled subsets, over which a score has a spread.
SAMPLED = {"ensemble", "effects", "exhaustive"}

METHODS = {
    "ensemble": "estimates many random subsets of one size and keeps every source whose subsets average a lower "
                "estimated target loss than the subsets without it",
    "effects": "estimates random subsets of every size, fits each source's additive effect on the estimated "
               "target loss, and keeps the sources whose effect lowers it",
    "exhaustive": "estimates every subset of the sources and keeps the one with the lowest estimated target loss",
    "forward": "starts from the target alone and keeps adding the source that lowers the estimated target loss "
               "most, until no addition lowers it",
    "backward": "starts from all sources and keeps dropping the source whose removal lowers the estimated target "
                "loss most, until no removal lowers it",
}

HIGHLIGHT, PLAIN = "#d95f02", "#7f8c9a"  # selected sources / mixes vs the rest

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.mark { background: #fdebd9; }
.warning { background: #fde2e1; border: 1px solid #c0392b; padding: .6em 1em; font-weight: bold; }
.missing { color: #666; font-style: italic; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


TITLE = "gradex report: "


def check_out(out: Path) -> None:
    """A report written elsewhere (`--out`) replaces only a file that is a gradex report: gradex never
    overwrites what it did not write."""
    if out.is_dir():
        raise ConfigError(f"report --out {out}: a directory; give a file name, e.g. {out / 'report.html'}")
    if out.exists():
        head = out.read_bytes()[:4096].decode("utf-8", errors="replace")
        if f"<title>{_e(TITLE)}" not in head:
            raise ConfigError(f"report --out {out}: the file exists and is not a gradex report; gradex does not "
                              f"overwrite it (give another name)")


def write(run_dir: Path, out: Path | None = None) -> Path:
    """Build `run_dir/report.html` (or `out`) from the artifacts present in `run_dir`; returns its path."""
    run_dir = Path(run_dir)
    cfg = _read(run_dir / "config.yaml") or {}
    selection = _read(run_dir / "selection.json")
    compare = _read(run_dir / "compare.json")
    name = str(cfg.get("name") or run_dir.name)
    sections = [
        _header(name, cfg, selection),
        _scores(run_dir, selection),
        _selected(selection, _read(run_dir / "final" / "metrics.json")),
        _validation(_read(run_dir / "validation.json")),
        _compare(compare),
        _costs(compare),
    ]
    title = f"{TITLE}{name}"
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            # an empty inline icon: otherwise the browser asks the file's folder for favicon.ico
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{_e(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n")
    path = out or run_dir / "report.html"
    write_bytes(path, page.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------- sections

def _header(name: str, cfg: dict, selection: dict | None) -> str:
    target = (cfg.get("data") or {}).get("target") or {}
    if selection is not None:
        sources = selection["sources"]
    else:  # before `select`, the config names the sources (unless they come from one sources_file)
        sources = [s["name"] for s in (cfg.get("data") or {}).get("sources") or []]
    items = [("run", name), ("target", target.get("name") or "unknown (no config.yaml)"),
             ("sources", ", ".join(sources) or "unknown")]
    if selection is not None:
        method = selection["method"]
        items.append(("method", f"{method}: {METHODS.get(method, 'see selection.json')}"))
        items.append(("reason", selection["reason"]))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return _section("Run", f"<table>{rows}</table>")


def _scores(run_dir: Path, selection: dict | None) -> str:
    title = "Per-source scores"
    if selection is None:
        return _missing(title, "selection.json", "gradex select CONFIG")
    sources = selection["sources"]
    scores = [selection["source_scores"].get(s) for s in sources]
    chosen = set(selection["selected"])
    parquet = run_dir / "estimates.parquet"
    errors: dict[str, float | None] = {}
    if selection["method"] not in SAMPLED:
        note = (f"The {_e(selection['method'])} method estimates no random sample of subsets, so the scores have no "
                f"spread to show.")
    elif not parquet.exists():
        note = "No estimates.parquet, so no spread: <code>gradex select CONFIG</code> writes it."
    else:
        errors, n = score_errors(parquet, sources)
        note = (f"Error bars: the standard error of (mean estimate of the subsets containing the source &minus; "
                f"mean of those without it), over the {n} subsets of the latest select call in estimates.parquet.")
    fig = Figure(figsize=(7, 0.4 * len(sources) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(sources))
    xerr = [_nan(errors.get(s)) for s in sources] if errors else None
    ax.barh(y, [_nan(v) for v in scores], xerr=xerr, capsize=3,
            color=[HIGHLIGHT if s in chosen else PLAIN for s in sources])
    ax.set_yticks(y, [_label(s) for s in sources])
    ax.invert_yaxis()  # first source on top, as in the table
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("score: estimated change of target validation loss when included (negative helps)")
    ax.set_title("selected sources highlighted", fontsize=9)
    found = selection.get("stability")
    rows = [[s, num(v, "+.4f"), num(errors.get(s), ".4f"), "yes" if s in chosen else ""]
            for s, v in zip(sources, scores)]
    header = ["source", "score", "standard error", "selected"]
    if found and "proportions" in selection:  # select.method weights: shares and their intervals
        header += ["proportion", f"{found['level']:.0%} interval (bootstrap)", "given a share in", ""]
        for row, s in zip(rows, sources):
            low, high = found["proportion_interval"][s]
            row += [f"{selection['proportions'][s]:.1%}", f"[{num(low, '.3f')}, {num(high, '.3f')}]",
                    f"{found['share'][s]:.0%}", "uncertain" if s in found["uncertain"] else ""]
    elif found:
        header += [f"{found['level']:.0%} interval (bootstrap)", "selected in", ""]
        for row, s in zip(rows, sources):
            low, high = found["score_interval"][s]
            row += [f"[{num(low, '+.4f')}, {num(high, '+.4f')}]", f"{found['share'][s]:.0%}",
                    "uncertain" if s in found["uncertain"] else ""]
        note += (f" Bootstrap: the selection re-made on {found['resamples']} resamples of the store's rows (each "
                 f"group's training examples and the target's validation examples, drawn with replacement); "
                 f"<em>selected in</em> is the share of resamples that selected the source, and a source is "
                 f"uncertain when that share is below {STABLE:.0%} for a selected source or above "
                 f"{FLIPS:.0%} for one left out.")
        note += "".join(f"</p>\n<p class=\"warning\">{_e(line)}" for line in stability_lines(selection))
    table = _table(header, rows, marked={i for i, s in enumerate(sources) if s in chosen})
    intro = ("The score of a source is the estimated change of the target validation loss when it is included: "
             "negative helps. Sources without a score (never or always sampled) have no bar.")
    return _section(title, f"<p>{intro}</p>\n{_png(fig, 'per-source scores')}\n<p>{note}</p>\n{table}")


def score_errors(parquet: Path, sources: Sequence[str]) -> tuple[dict[str, float | None], int]:
    """Per source, the standard error of mean(estimate | source in subset) - mean(estimate | not in it).

    The parquet accumulates rows of every call; the rows of the latest select share the fingerprint
    of the last row that select wrote (rows of `gradex estimate` calls are left out). None where
    either side has fewer than two subsets. Returns (errors, rows used).
    """
    import pandas as pd

    frame = pd.read_parquet(parquet)
    if "stage" in frame:
        frame = frame[frame["stage"] == "select"]
    if frame.empty:
        return {s: None for s in sources}, 0
    frame = frame[(frame["fingerprint"] == frame["fingerprint"].iloc[-1]) & np.isfinite(frame["estimate"])]
    est = frame["estimate"].to_numpy(dtype=np.float64)
    members = [set(m) for m in frame["members"]]
    errors: dict[str, float | None] = {}
    for s in sources:
        inside = np.array([s in m for m in members], dtype=bool)
        a, b = est[inside], est[~inside]
        errors[s] = (math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
                     if len(a) > 1 and len(b) > 1 else None)
    return errors, len(frame)


def _selected(selection: dict | None, final: dict | None) -> str:
    title = "Selected mix"
    if selection is None:
        return _missing(title, "selection.json", "gradex select CONFIG")
    parts = []
    if selection["worse_than_target"]:
        parts.append("<p class=\"warning\">Warning: the selected sources are estimated to make the target WORSE "
                     "than fine-tuning on the target alone. Consider select.method exhaustive, forward or "
                     "effects.</p>")
    mix = ", ".join(selection["selected"]) or "none: the target alone"
    parts.append(f"<p>Fine-tune on the target plus: <b>{_e(mix)}</b>.</p>")
    if "proportions" in selection:  # select.method weights
        m = selection["mixture"]
        shares = ", ".join(f"{_e(n)} {p:.1%} ({m['counts'][n]} examples)" for n, p in zip(m["datasets"], m["probabilities"]))
        parts.append(f"<p>In proportions, for a budget of {m['budget_examples']} examples: <b>{shares}</b> "
                     f"(mixture.yaml, for <code>datasets.interleave_datasets(probabilities=...)</code>).</p>")
    parts.append(f"<p>Why: {_e(selection['reason'])}</p>")
    if selection.get("clusters"):  # the sources are clusters: what each selected one holds
        items = "".join(f"<li><b>{_e(name)}</b> ({found['size']} examples), e.g. "
                        + "; ".join(f"<code>{_e(p)}</code>" for p in found["examples"]) + "</li>"
                        for name, found in selection["clusters"].items())
        parts.append(f"<p>The sources are clusters of unlabelled examples (every cluster's members: "
                     f"clusters/clusters.json). The selected ones:</p><ul>{items}</ul>")
    est, base = selection["estimate"], selection["baseline"]
    change = f" ({num(est - base, '+.4f')})" if _finite(est) and _finite(base) else ""
    parts.append(f"<p>Estimated target validation loss of the selection: {num(est, '.4f')}; of the target alone: "
                 f"{num(base, '.4f')}{change}. The estimates model fine-tuning from the meta-initialization "
                 f"&theta;* ({_e(selection['mode'])} mode).</p>")
    if final is None:
        parts.append(_absent("final/metrics.json", "gradex finetune CONFIG", "the final model's metrics"))
    else:
        val, test = final["validation"], final["test"]
        parts.append(f"<p>Final model (final/metrics.json, {_e(final['recipe']['description'])}): validation loss "
                     f"{num(val['loss'], '.4f')}, test loss {num(test['loss'], '.4f')}, test "
                     f"{_e(test['metric'])} {num(test['score'])} on {test['examples']} examples"
                     + (f"; {test['no_match']} generations without a match of the answer pattern "
                        f"<code>{_e(test['answer_pattern'])}</code> (scored wrong)" if "no_match" in test else "")
                     + ".</p>")
    return _section(title, "\n".join(parts))


def _validation(validation: dict | None) -> str:
    title = "Estimates vs real fine-tunes"
    if validation is None:
        return _missing(title, "validation.json", "gradex validate CONFIG --subsets 20 --seeds 2")
    rows = validation["rows"]
    est = np.array([_nan(r["estimate"]) for r in rows])
    real = np.array([_nan(r["real"]) for r in rows])
    seeds = [[_nan(v) for v in r["seeds"]] or [math.nan] for r in rows]
    yerr = np.array([[y - min(s) for y, s in zip(real, seeds)], [max(s) - y for y, s in zip(real, seeds)]])
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(est, real, yerr=yerr, fmt="o", capsize=3, color=HIGHLIGHT, label="subset (bar: seed range)")
    both = np.concatenate([est, real])
    both = both[np.isfinite(both)]
    if len(both):
        ax.plot([both.min(), both.max()], [both.min(), both.max()], color="gray", lw=0.8, label="estimate = real")
    ax.set(xlabel="estimated target validation loss", ylabel="real target validation loss (mean of seeds)")
    ax.legend(fontsize=8)
    stats = [("spearman", "rank correlation of estimates and real losses", ".3f"),
             ("pearson", "linear correlation", ".3f"),
             ("mean_abs_rel_error", "mean relative error of the estimates", ".2%"),
             ("seed_noise", "how much two seeds of one fine-tune disagree", ".2%"),
             ("constant_error", "error of predicting theta*'s loss for every subset", ".2%")]
    table = _table(["statistic", "value", "meaning"],
                   [[key, num(validation.get(key), fmt), meaning] for key, meaning, fmt in stats])
    text = (f"<p>{validation['subsets']} random subsets fine-tuned for real: "
            f"{_e(validation['recipe_description'])}.</p>")
    return _section(title, f"{text}\n{_png(fig, 'estimated vs real loss')}\n{table}")


def _compare(compare: dict | None) -> str:
    title = "Comparison with baselines"
    if compare is None:
        return _missing(title, "compare.json", "gradex compare CONFIG --seeds 3")
    metric = compare["metric"]
    mixes = compare["mixes"]
    rows = [[shown(m), m["kind"], _members(m["members"]), str(len(m["seeds"])),
             f"{num(m['test_loss']['mean'], '.4f')} ({num(m['test_loss']['sd'], '.4f')})",
             f"{num(m['test_score']['mean'])} ({num(m['test_score']['sd'])})",
             interval_text(m.get("diff_loss")), m.get("verdict_loss", ""),
             interval_text(m.get("diff_score")), m.get("verdict_score", "")] for m in mixes]
    header = ["mix", "kind", "sources", "seeds", "test loss (sd)", f"test {metric} (sd)",
              "loss gain [95% CI]", "loss verdict", f"{metric} gain [95% CI]", f"{metric} verdict"]
    if any("test_no_match" in m for m in mixes):  # an answer pattern: generations it found no answer in
        header.insert(6, "no match (mean)")
        for row, m in zip(rows, mixes):
            row.insert(6, num(m["test_no_match"]["mean"], ".1f") if "test_no_match" in m else "-")
    table = _table(header, rows, marked={i for i, m in enumerate(mixes) if m["name"] == SELECTED})
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("test_score", "test_loss"), (f"test {metric}", "test loss")):
        _spread_plot(ax, mixes, key, label)
    text = (f"<p>Every mix fine-tuned with the same recipe ({_e(compare['recipe']['description'])}), "
            f"{compare['seeds']} seed(s) per mix, evaluated on the target test split "
            f"({compare['test_examples']} examples).</p>\n"
            f"<p><b>Verdict:</b> {_e(compare['verdict'])}</p>")
    note = ("<p>Gain: the baseline's test loss minus the selection's (or the selection's score minus the "
            "baseline's), paired by seed, with its 95% Student-t interval; positive = gradex's selection "
            "better. One seed gives no interval and no verdict (untested).</p>")
    if any("same_mix" in m for m in mixes):
        note += ("<p>a = b: the same mix (the same sources at every seed), fine-tuned once and shown once; a "
                 "baseline that is the selection's mix is not compared with it.</p>")
    figure = _png(fig, "test metric and loss per mix")
    return _section(title, f"{text}\n{figure}\n<p>Points: each seed; bars: mean &plusmn; sd.</p>\n{table}\n{note}")


def _spread_plot(ax: Any, mixes: list[dict], key: str, label: str) -> None:
    """One mix per column: its seeds as dots, their mean with a &plusmn; sd bar."""
    for x, m in enumerate(mixes):
        color = HIGHLIGHT if m["name"] == SELECTED else PLAIN
        values = [_nan(v) for v in m[key]["values"]]
        ax.scatter([x] * len(values), values, color=color, alpha=0.5, s=14)
        ax.errorbar([x + 0.15], [_nan(m[key]["mean"])], yerr=[_nan(m[key]["sd"])], fmt="s", color=color, capsize=4)
    ax.set_xticks(range(len(mixes)), [_label(shown(m)) for m in mixes], rotation=30, ha="right")
    ax.set_ylabel(label)


def _costs(compare: dict | None) -> str:
    title = "Stage costs"
    if compare is None:
        return _missing(title, "compare.json", "gradex compare CONFIG")
    cost = compare["cost"]
    ran = cost.get("ran_on") or {}  # compare.json before gradex recorded devices has none
    rows = [[stage, num(seconds, ".1f"), ran.get(stage) or ""] for stage, seconds in cost["stages_seconds"].items()]
    rows.append([f"selection in all ({' + '.join(cost['stages_seconds'])})", num(cost.get("selection_seconds"), ".1f"), ""])
    rows.append(["one fine-tune", num(cost.get("finetune_seconds"), ".1f"), ran.get("finetune") or ""])
    if cost.get("forward_finetunes") is not None:
        rows.append([f"the same search by real fine-tuning ({cost['forward_finetunes']} fine-tunes, extrapolated)",
                     num(cost.get("by_finetuning_seconds"), ".1f"), ""])
        rows.append(["speedup of the selection over it", num(cost.get("speedup"), ".1f"), ""])
    return _section(title, _table(["stage", "seconds", "ran on (device, precision)"], rows))


# ---------------------------------------------------------------------------- helpers

def _read(path: Path) -> Any:
    """A JSON or YAML artifact, or None when it does not exist (yet)."""
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _nan(value: float | None) -> float:
    """JSON null as NaN, which matplotlib leaves out of a plot."""
    return math.nan if value is None else float(value)


def _label(text: str) -> str:
    """A name as matplotlib text: an unescaped `$` would start mathtext."""
    return text.replace("$", r"\$")


def _members(per_seed: list[list[str]]) -> str:
    distinct = list(dict.fromkeys(", ".join(m) or "(target only)" for m in per_seed))
    return distinct[0] if len(distinct) == 1 else "per seed: " + " | ".join(distinct)


def _png(fig: Figure, alt: str) -> str:
    """The figure as an inline PNG <img>.

    A bare Figure with an Agg canvas never enters pyplot's registry of open figures, so there is
    nothing to close: it is freed with the object, and no global backend is switched.
    """
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], marked: Collection[int] = ()) -> str:
    """An HTML table of escaped text; rows in `marked` are highlighted, numbers right-aligned."""
    def cell(text: str) -> str:
        numeric = bool(text) and text[0] in "+-0123456789"
        return f"<td class=\"n\">{_e(text)}</td>" if numeric else f"<td>{_e(text)}</td>"

    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        mark = " class=\"mark\"" if i in marked else ""
        out.append(f"<tr{mark}>" + "".join(cell(c) for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _section(title: str, body: str) -> str:
    return f"<section>\n<h2>{_e(title)}</h2>\n{body}\n</section>"


def _absent(filename: str, command: str, what: str) -> str:
    return (f"<p class=\"missing\">No {_e(filename)} in this run yet: <code>{_e(command)}</code> writes it "
            f"and adds {_e(what)} here (CONFIG: this run's experiment YAML, or its resolved copy config.yaml in "
            f"this run directory).</p>")


def _missing(title: str, filename: str, command: str) -> str:
    return _section(title, _absent(filename, command, "this section"))
