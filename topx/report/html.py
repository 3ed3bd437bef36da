"""The run report as one self-contained HTML page: inline CSS, plots as inline SVG drawn by matplotlib's
Agg backend, no script, no font or image fetched from anywhere.

Every number the page states from metrics.json sits in an element carrying ``data-metric`` (its key in
metrics.json, dotted for nested keys) and ``data-value`` (the value as JSON writes it), so a reader, or
a test, can check the page against the file. Every plot is a ``<figure data-plot="NAME">``.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Callable
from typing import Any

from topx.report.summary import Histogram

PLOT_WIDTH_IN = 6.4
PLOT_HEIGHT_IN = 3.2
MODEL, POPULARITY, LIVE = "#2b6cb0", "#a0aec0", "#dd6b20"

CSS = """
:root { color-scheme: light; --ink: #1a202c; --muted: #4a5568; --line: #e2e8f0; --good: #276749;
        --good-bg: #f0fff4; --bad: #9b2c2c; --bad-bg: #fff5f5; --card: #f7fafc; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 1rem; font: 16px/1.5 system-ui, -apple-system, "Segoe UI",
       Roboto, sans-serif; color: var(--ink); }
h1 { font-size: 1.6rem; margin: 0.2rem 0; } h2 { font-size: 1.25rem; margin-top: 2rem;
     border-bottom: 1px solid var(--line); padding-bottom: 0.2rem; }
h3 { font-size: 1rem; margin: 1rem 0 0.3rem; }
.sub { color: var(--muted); margin: 0 0 1rem; }
.verdict { border-radius: 8px; padding: 0.8rem 1rem; margin: 1rem 0; font-size: 1.1rem; }
.verdict.good { background: var(--good-bg); color: var(--good); border: 1px solid #9ae6b4; }
.verdict.bad { background: var(--bad-bg); color: var(--bad); border: 1px solid #feb2b2; }
.verdict.none { background: var(--card); border: 1px solid var(--line); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 0.6rem; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 0.5rem 0.7rem; }
.card .v { font-size: 1.3rem; font-weight: 600; display: block; } .card .k { color: var(--muted); font-size: 0.85rem; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 1rem; }
figure { margin: 0; max-width: 760px; } figure svg { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 0.85rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 0.92rem; }
th, td { text-align: left; padding: 0.25rem 0.5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.users { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 1rem; }
.user { border: 1px solid var(--line); border-radius: 8px; padding: 0.6rem 0.8rem; }
.tag { font-size: 0.75rem; background: #ebf8ff; color: #2c5282; border-radius: 4px; padding: 0 0.3rem; }
.note { color: var(--muted); font-size: 0.9rem; }
@media (max-width: 600px) { body { padding: 0.6rem; font-size: 15px; } h1 { font-size: 1.3rem; } }
"""


# ----------------------------------------------------------------------------- numbers


def _fmt(value: Any, kind: str = "num") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if kind == "pct":
            return f"{value:.1%}"
        if kind == "density":
            return f"{value:.3%}" if value >= 1e-3 else f"{value:.2e}"
        if kind == "count":
            return f"{value:,.1f}".removesuffix(".0")
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4f}"
    return str(value)


def _num(key: str, value: Any, kind: str = "num", tag: str = "span", cls: str = "") -> str:
    """An element stating ``value`` from metrics.json under ``key``, with data-metric and data-value."""
    attrs = f' class="{cls}"' if cls else ""
    data = html.escape(json.dumps(value, allow_nan=True), quote=True)
    return f'<{tag}{attrs} data-metric="{html.escape(key, quote=True)}" data-value="{data}">{_fmt(value, kind)}</{tag}>'


def _card(label: str, key: str | None, value: Any, kind: str = "num") -> str:
    shown = _num(key, value, kind, cls="v") if key else f'<span class="v">{_fmt(value, kind)}</span>'
    return f'<div class="card">{shown}<span class="k">{html.escape(label)}</span></div>'


def _esc(text: Any) -> str:
    return html.escape(str(text))


# ----------------------------------------------------------------------------- plots


def _figure(name: str, caption: str, draw: Callable[[Any], None], *, width: float = PLOT_WIDTH_IN,
            height: float = PLOT_HEIGHT_IN) -> str:
    """Draw with matplotlib (Agg) into an inline SVG, wrapped in a figure named ``name``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name, "font.size": 10,
                                "axes.spines.top": False, "axes.spines.right": False}):
        fig = Figure(figsize=(width, height))
        draw(fig)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return f'<figure data-plot="{name}">{_inline_svg(buf.getvalue(), name)}<figcaption>{caption}</figcaption></figure>'


_SVG_ROOT_SIZE = re.compile(r'(<svg\b[^>]*?)\s(?:width|height)="[^"]*"')


def _inline_svg(svg: str, name: str) -> str:
    """matplotlib's SVG document made an inline element: no XML prolog, doctype or metadata, a size that
    follows the page, and its ids prefixed with the plot's name so that plots on one page never share one."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    while _SVG_ROOT_SIZE.search(svg[: svg.index(">") + 1]):
        svg = _SVG_ROOT_SIZE.sub(r"\1", svg, count=1)
    # An inline SVG takes its namespaces from the HTML parser: the declarations name no resource, but a page
    # that holds no URL at all is simpler to check.
    svg = re.sub(r'\sxmlns(?::xlink)?="[^"]*"', "", svg)
    svg = re.sub(r'\sid="([^"]+)"', rf' id="{name}-\1"', svg)
    svg = re.sub(r'url\(#([^)]+)\)', rf'url(#{name}-\1)', svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'href="#{name}-\1"', svg)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{name}" ', 1)


def _steps(ax: Any, hist: Histogram, label: str, color: str, normalise: bool = False) -> None:
    counts = list(hist.counts)
    total = sum(counts)
    if normalise and total:
        counts = [c / total for c in counts]
    if counts:
        ax.stairs(counts, hist.edges, label=label, color=color, linewidth=1.8)


def _long_tail(data: dict[str, Any]) -> str:
    def draw(fig: Any) -> None:
        for i, (key, what) in enumerate((("per_item", "item"), ("per_user", "user"))):
            ax = fig.add_subplot(1, 2, i + 1)
            _steps(ax, data[key], what, MODEL)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"interactions per {what}")
            ax.set_ylabel(f"{what}s")
    return _figure("long_tail", "How many items (left) and users (right) have how many interactions, on log axes: "
                   "a long tail is the usual shape.", draw)


def _training(history: list[dict[str, float]], best_epoch: int | None) -> str:
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    has_time = all("seconds" in h for h in history)

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 2 if has_time else 1, 1)
        for key, color in (("train_loss", MODEL), ("validation_loss", LIVE)):
            if any(key in h for h in history):
                ax.plot([e for e, h in zip(epochs, history, strict=True) if key in h],
                        [h[key] for h in history if key in h], marker="o", color=color,
                        label=key.replace("_", " "))
        if best_epoch:
            ax.axvline(best_epoch, color="#38a169", linestyle="--", label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        handles, labels = ax.get_legend_handles_labels()
        recall = next((k for h in history for k in h if k.startswith("holdout_recall_at_")), None)
        if recall is not None:  # the icd learner's hold-out recall per epoch, on its own axis
            axr = ax.twinx()
            axr.plot([e for e, h in zip(epochs, history, strict=True) if recall in h],
                     [h[recall] for h in history if recall in h], marker="s", color=LIVE,
                     label=recall.replace("_at_", "@").replace("_", " "))
            axr.set_ylabel(recall.replace("_at_", "@").replace("_", " "))
            more_handles, more_labels = axr.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax.legend(handles, labels, frameon=False, fontsize=8)
        if has_time:
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.bar(epochs, [h["seconds"] for h in history], color=POPULARITY)
            ax2.set_xlabel("epoch")
            ax2.set_ylabel("seconds")
    return _figure("training", "Loss per epoch (the validation loss where the learner keeps one; for the icd "
                   "learner, recall on a sample of the hold-out, shown and never used to choose), the best epoch "
                   "marked" + ("; right: wall time of each epoch." if has_time else "."), draw)


def _metric_bars(rows: list[tuple[str, float, float | None, float | None]]) -> str:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        names = [r[0] for r in rows]
        series = [("model", 1, MODEL), ("popularity", 2, POPULARITY), ("live model", 3, LIVE)]
        shown = [s for s in series if any(r[s[1]] is not None for r in rows)]
        height = 0.8 / max(len(shown), 1)
        for j, (label, col, color) in enumerate(shown):
            ys = [i + j * height for i in range(len(rows))]
            ax.barh(ys, [r[col] or 0.0 for r in rows], height=height, color=color, label=label)
        ax.set_yticks([i + height * (len(shown) - 1) / 2 for i in range(len(rows))], names)
        ax.invert_yaxis()
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    return _figure("metrics", "The hold-out metrics of the model beside recommending the most popular items "
                   "to everyone (longer is better).", draw, height=max(2.0, 0.4 * len(rows) + 0.9))


def _popularity(recs: dict[str, Any]) -> str:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        _steps(ax, recs["popularity_catalogue"], "items of the catalogue", POPULARITY, normalise=True)
        _steps(ax, recs["popularity_recommended"], "recommended items", MODEL, normalise=True)
        ax.set_xscale("log")
        ax.set_xlabel("interactions of the item + 1 (its popularity)")
        ax.set_ylabel("share")
        ax.legend(frameon=False, fontsize=8)
    return _figure("popularity", "How popular the recommended items are, against the catalogue's items: a blue "
                   "curve far to the right means the lists lean on the most popular items.", draw)


def _frequency(recs: dict[str, Any]) -> str:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        curve = recs["frequency_curve"]
        ax.plot(curve["rank"], [max(t, 0.5) for t in curve["times"]], color=MODEL)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items, most recommended first")
        ax.set_ylabel("times recommended")
    return _figure("frequency", "How often each item is recommended, items ranked from the most recommended; "
                   "items never recommended sit at the bottom edge.", draw)


def _scores(recs: dict[str, Any]) -> str:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        _steps(ax, recs["scores"], "users with interactions", MODEL)
        if sum(recs["scores_cold_users"].counts):
            _steps(ax, recs["scores_cold_users"], "cold users (features only)", LIVE)
        ax.set_xlabel("score of a recommended item (the FM's prediction)")
        ax.set_ylabel("recommendations")
        ax.legend(frameon=False, fontsize=8)
    sampled = ("" if recs["scores_sampled"] >= recs["scores_of"]
               else f" From a uniform sample of {recs['scores_sampled']:,} of the {recs['scores_of']:,} scores.")
    return _figure("scores", "The scores of the recommended items." + sampled, draw)


# ----------------------------------------------------------------------------- sections


def _verdict(metrics: dict[str, Any], gate: dict[str, Any] | None) -> str:
    x = metrics.get("top_x", 10)
    if gate is not None:
        cls = "good" if gate.get("passed") else "bad"
        word = "passed" if gate.get("passed") else "refused"
        head = f'The quality gate <b>{word}</b> this model: {_num("gate.reason", gate.get("reason", ""), "str")}.'
        return f'<div class="verdict {cls}" data-verdict="{cls}">{head} {_comparison(metrics, x)}</div>'
    comparison = _comparison(metrics, x)
    if not comparison:
        return ('<div class="verdict none" data-verdict="none">Not evaluated: '
                f'{_esc(metrics.get("note", "no hold-out metrics in metrics.json"))}.</div>')
    cls = "good" if _beats_baseline(metrics, x) else "bad"
    return f'<div class="verdict {cls}" data-verdict="{cls}">{comparison}</div>'


def _beats_baseline(metrics: dict[str, Any], x: int) -> bool:
    if "rmse" in metrics and "rmse_global_mean" in metrics:
        return metrics["rmse"] < metrics["rmse_global_mean"]
    return metrics.get(f"recall_at_{x}", 0.0) > metrics.get(f"popularity_recall_at_{x}", math.inf)


def _comparison(metrics: dict[str, Any], x: int) -> str:
    if "rmse" in metrics and "rmse_global_mean" in metrics:
        better = metrics["rmse"] < metrics["rmse_global_mean"]
        return (f'Its hold-out RMSE is {_num("rmse", metrics["rmse"])}, '
                f'{"better" if better else "no better"} than predicting the mean rating '
                f'({_num("rmse_global_mean", metrics["rmse_global_mean"])}).')
    recall, popular = metrics.get(f"recall_at_{x}"), metrics.get(f"popularity_recall_at_{x}")
    if recall is None or popular is None:
        return ""
    if recall > popular:
        lift = f" ({(recall / popular - 1):+.0%})" if popular else ""
        return (f'It finds more of what users did next than the most popular items do: recall@{x} '
                f'{_num(f"recall_at_{x}", recall)} against {_num(f"popularity_recall_at_{x}", popular)}{lift}.')
    return (f'It does <b>not</b> beat recommending the most popular items: recall@{x} '
            f'{_num(f"recall_at_{x}", recall)} against {_num(f"popularity_recall_at_{x}", popular)}. '
            'Try <code>topx run --tune</code>, or more interactions per user.')


def _data_section(data: dict[str, Any] | None, metrics: dict[str, Any]) -> str:
    if data is None:
        return '<h2>Data</h2><p class="note">The run\'s interactions were not available to summarise.</p>'
    cards = "".join([
        _card("users", "data.n_users", data["n_users"]), _card("items", "data.n_items", data["n_items"]),
        _card("interactions", "data.n_interactions", data["n_interactions"]),
        _card("density", None, data["density"], "density"),
        _card("median interactions per user", None, data["median_per_user"], "count"),
        _card("median interactions per item", None, data["median_per_item"], "count"),
        _card("interactions on the 10% most popular items", None, data["top_10pct_items_share"], "pct"),
        _card("cold users (no interactions)", "data.cold_users", data["cold_users"]),
        _card("cold items (no interactions)", "data.cold_items", data["cold_items"]),
    ])
    split = metrics.get("holdout_split")
    held = ""
    if "n_holdout" in metrics:
        held = (f'<p class="note">Hold-out: {_num("n_holdout", metrics["n_holdout"])} interactions '
                f'({_esc(split or "random")} split) of which training saw none; '
                f'{_num("n_train", metrics.get("n_train"))} trained on.</p>')
    boost = metrics.get("recency_boost")
    if boost:
        held += (f'<p class="note">Recency boost: within each user\'s interactions in time order, the latest '
                 f'weighed {_esc(f"{1 + boost:g}")} times the earliest (<code>recency_boost</code> '
                 f'{_esc(f"{boost:g}")}).</p>')
    return f'<h2>Data</h2><div class="cards">{cards}</div>{held}<div class="plots">{_long_tail(data)}</div>'


def _training_section(metrics: dict[str, Any]) -> str:
    training = metrics.get("training") or {}
    history = training.get("history") or []
    cards = "".join([
        _card("learner", None, metrics.get("learner", "–")),
        _card("device", "training.device", training.get("device")),
        _card("epochs run", "training.epochs_run", training.get("epochs_run")),
        _card("best epoch", "training.best_epoch", training.get("best_epoch")),
        _card("latent dimension k", "hyperparameters.num_factors",
              (metrics.get("hyperparameters") or {}).get("num_factors")),
    ])
    timings = metrics.get("timings_s") or {}
    if "total" in timings:
        cards += _card("run, seconds", "timings_s.total", timings["total"])
    plot = f'<div class="plots">{_training(history, training.get("best_epoch"))}</div>' if history else ""
    return f"<h2>Training</h2><div class=\"cards\">{cards}</div>{_tuning_note(metrics.get('tuning'))}{plot}"


def _tuning_note(tuning: dict[str, Any] | None) -> str:
    """What the search of the settings before training found, and whether it changed them (topx.tune)."""
    if not tuning:
        return ""

    def settings(values: dict[str, Any]) -> str:
        return ", ".join(f"{name} {value:g}" for name, value in values.items())
    tried = f"{len(tuning.get('trials', []))} settings tried on a carve of the training rows"
    from topx.tune import outcome

    gain = _num("tuning.gain", tuning.get("gain"), "pct")
    ended = outcome(tuning)
    if ended == "changed":
        found = f"chose {_esc(settings(tuning['chosen']))}, {gain} better there than the given settings."
    elif ended == "given_best":
        found = f"kept the given settings ({_esc(settings(tuning['chosen']))}), which scored best there."
    else:
        found = (f"kept the given settings ({_esc(settings(tuning['chosen']))}): the best point, "
                 f"{_esc(settings(tuning.get('best_point', {})))}, was {gain} better there, under the "
                 f"{_fmt(tuning.get('min_gain'), 'pct')} a change needs.")
    return f'<p class="note">Before training, {tried} ({_esc(tuning.get("mode", "on"))}): {found}</p>'


def _metrics_section(metrics: dict[str, Any], live: dict[str, Any] | None) -> str:
    x = metrics.get("top_x", 10)
    live_metrics = (live or {}).get("metrics") or {}
    rows = []
    if "rmse" in metrics:
        rows.append(("RMSE (lower is better)", "rmse", "rmse_global_mean"))
    for name in ("recall", "ndcg", "map", "coverage"):
        if f"{name}_at_{x}" in metrics:
            rows.append((f"{name}@{x}", f"{name}_at_{x}", f"popularity_{name}_at_{x}"))
    for name in ("auc", "log_loss"):
        if name in metrics:
            rows.append((name, name, None))
    if not rows:
        return f'<h2>Hold-out metrics</h2><p class="note">{_esc(metrics.get("note", "none in metrics.json"))}</p>'
    live_head = f'<th class="n">live model ({_esc(live.get("version", ""))})</th>' if live_metrics else ""
    body = []
    for label, key, base in rows:
        base_cell = _num(base, metrics[base], tag="td", cls="n") if base and base in metrics else '<td class="n">–</td>'
        live_cell = ""
        if live_metrics:
            live_cell = (_num(f"live.{key}", live_metrics[key], tag="td", cls="n") if key in live_metrics
                         else '<td class="n">–</td>')
        body.append(f"<tr><th>{_esc(label)}</th>{_num(key, metrics[key], tag='td', cls='n')}{base_cell}{live_cell}</tr>")
    table = (f'<div class="table-wrap"><table data-table="metrics"><thead><tr><th>metric</th><th class="n">model</th>'
             f'<th class="n">popularity</th>{live_head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    bars = [(label, metrics[key], metrics.get(base) if base else None, live_metrics.get(key))
            for label, key, base in rows if key not in ("rmse", "log_loss") and _finite(metrics[key])]
    plot = f'<div class="plots">{_metric_bars(bars)}</div>' if bars else ""
    relevance = metrics.get("relevance")
    note = (f'<p class="note">Relevant: {_esc(relevance)}; ranked over {_num("ranking_users", metrics.get("ranking_users"))} '
            f'users of the hold-out.</p>' if relevance else "")
    return f"<h2>Hold-out metrics</h2>{table}{note}{plot}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _recommendations_section(recs: dict[str, Any] | None, metrics: dict[str, Any], absent: str) -> str:
    if recs is None:
        return f'<h2>Recommendations</h2><p class="note">{_esc(absent)}</p>'
    x = metrics.get("top_x", 10)
    cards = "".join([
        _card("users with a list", None, recs["users"]), _card("recommendations", None, recs["rows"]),
        _card("items per list (x)", "top_x", x),
        _card("catalogue recommended to someone", None, recs["coverage"], "pct"),
        _card("items recommended", None, recs["items_recommended"]),
        _card("slots given to the 10% most popular items", None, recs["top_10pct_items_rec_share"], "pct"),
        _card("slots given to cold items", "cold.cold_item_share",
              (metrics.get("cold") or {}).get("cold_item_share", recs["cold_item_share"]), "pct"),
    ])
    fallback = metrics.get("fallback") or {}
    fb = (f'<p class="note">Users the model has not seen get the fallback list, chosen from '
          f'{_num("fallback.source", fallback["source"])}.</p>' if "source" in fallback else "")
    plots = _popularity(recs) + _frequency(recs) + _scores(recs)
    return f'<h2>Recommendations</h2><div class="cards">{cards}</div>{fb}<div class="plots">{plots}</div>'


def _item_cell(entry: dict[str, Any]) -> str:
    title = f"{_esc(entry['title'])} <span class=\"note\">{_esc(entry['item_id'])}</span>" if entry.get("title") \
        else _esc(entry["item_id"])
    return title + (' <span class="tag">new item</span>' if entry.get("cold_item") else "")


def _times(times: int) -> str:
    return "" if times == 1 else f" ×{times}"


def _samples_section(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return ""
    blocks = []
    for user in samples:
        history = "".join(f"<li>{_item_cell(h)}{_times(h['times'])}</li>" for h in user["history"]) \
            or '<li class="note">no interactions: listed from their features</li>'

        more = (f'<p class="note">… of {user["history_size"]:,} interactions</p>'
                if user["history_size"] > len(user["history"]) else "")
        rows = "".join(f'<tr><td class="n">{r["rank"]}</td><td>{_item_cell(r)}</td><td class="n">{r["score"]:.3f}</td></tr>'
                       for r in user["list"])
        listing = (f'<div class="table-wrap"><table><thead><tr><th class="n">#</th><th>recommended</th>'
                   f'<th class="n">score</th></tr></thead><tbody>{rows}</tbody></table></div>' if rows
                   else '<p class="note">nothing left to recommend</p>')
        cold = ' <span class="tag">cold user</span>' if user["cold"] else ""
        blocks.append(f'<div class="user" data-user="{_esc(user["user_id"])}"><h3>{_esc(user["user_id"])}{cold}</h3>'
                      f'<b>History</b><ul>{history}</ul>{more}<b>List</b>{listing}</div>')
    return f'<h2>What some users will be shown</h2><div class="users">{"".join(blocks)}</div>'


def render_report(
    metrics: dict[str, Any],
    *,
    title: str,
    data: dict[str, Any] | None,
    recommendations: dict[str, Any] | None,
    samples: list[dict[str, Any]],
    gate: dict[str, Any] | None = None,
    live: dict[str, Any] | None = None,
    recommendations_absent: str = "No recommendations were written.",
) -> str:
    """The page. ``metrics``: metrics.json; ``data``/``recommendations``: InteractionTally.summary and
    RecommendationTally.summary; ``samples``: topx.report.summary.sample_users; ``gate``: the deployed
    quality gate's reply; ``live``: {"version", "metrics"} of the live model it compared with."""
    objective = metrics.get("objective", "ranking")
    sub = (f'{_esc(objective)} · {_esc(metrics.get("learner", ""))} learner · top-{_esc(metrics.get("top_x", ""))} '
           f'· {_esc(metrics.get("search_method", "exact"))} search')
    parts = [
        f"<h1>{_esc(title)}</h1>", f'<p class="sub">{sub}</p>',
        _verdict(metrics, gate),
        _metrics_section(metrics, live),
        _recommendations_section(recommendations, metrics, recommendations_absent),
        _samples_section(samples),
        _data_section(data, metrics),
        _training_section(metrics),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{''.join(parts)}"
            '<p class="note">Written by topx from metrics.json and the run\'s files; this page loads nothing '
            "from anywhere.</p></body></html>\n")
