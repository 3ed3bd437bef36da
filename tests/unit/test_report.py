"""The run report as a person sees it: rendered by headless Chromium, on a phone-sized screen, it shows its
plots, asks the network for nothing, and states the numbers metrics.json holds."""

from __future__ import annotations

import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from chromium import render

from topx.cli import main
from topx.config import default_hyperparameters
from topx.dataset import DataOptions
from topx.report import build_report
from topx.run import run_all
from topx.steps import Reporter, RunOptions
from topx.synth import generate

PLOTS = {"metrics", "popularity", "frequency", "scores", "long_tail", "training"}
COLD_ITEMS = ("new-1", "new-2", "new-3")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small `topx run` whose items table has titles and three items nobody has touched yet."""
    work = tmp_path_factory.mktemp("report")
    data = generate(300, 120, seed=5)
    paths = data.write(work / "in")
    items = data.items.copy()
    items = pd.concat([items, items.head(len(COLD_ITEMS)).assign(item_id=list(COLD_ITEMS))], ignore_index=True)
    items["title"] = [f"Title of {i} & <co>" for i in items["item_id"]]
    items.to_csv(paths["items"], index=False)
    options = DataOptions(interactions=str(paths["interactions"]), items=str(paths["items"]), rating_col="plays",
                          implicit=True)
    hp = default_hyperparameters("ranking", num_factors=8, epochs=3, learner="sgd")
    run_all(options, hp, RunOptions(top_x=5, progress=False), work / "out", reporter=Reporter(False))
    return work / "out"


class _Numbers(HTMLParser):
    """Every element's data-metric and data-value, and the text inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, Any, str]] = []
        self._open: list[list[Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-metric" in a:
            self._open.append([tag, a["data-metric"], json.loads(a["data-value"] or "null"), ""])

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][3] += data

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            _, key, value, text = self._open.pop()
            self.found.append((key, value, text.strip()))


def _lookup(metrics: dict[str, Any], dotted: str) -> Any:
    node: Any = metrics
    for part in dotted.split("."):
        node = node[part]
    return node


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def test_topx_run_writes_a_report_a_phone_renders_offline_with_the_metrics_numbers(run_dir: Path, chromium: str,
                                                                                   tmp_path: Path) -> None:
    page = run_dir / "report.html"
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    shown = render(chromium, page)

    # Nothing but the page itself was requested: no font, script, stylesheet or image from anywhere.
    assert shown.requests == [page.resolve().as_uri()]
    # A phone-wide screen: nothing wider than the viewport, and a long page drawn (not a blank one).
    assert shown.page_width <= 390
    width, height = _png_size(shown.screenshot)
    assert width == 390 and height > 2000
    (tmp_path / "report.png").write_bytes(shown.screenshot)

    # The plots are there, each an inline SVG with drawn paths.
    figures = dict(re.findall(r'<figure data-plot="(\w+)">(.*?)</figure>', shown.dom, flags=re.S))
    assert set(figures) == PLOTS
    for name, body in figures.items():
        assert body.lstrip().startswith("<svg") and body.count("<path") >= 3, name

    # Every number the page states from metrics.json is the file's, shown as the file has it.
    parser = _Numbers()
    parser.feed(shown.dom)
    keys = {key for key, _, _ in parser.found}
    assert {"recall_at_5", "popularity_recall_at_5", "ndcg_at_5", "popularity_ndcg_at_5", "coverage_at_5",
            "auc", "n_holdout", "data.n_users", "data.n_items", "data.n_interactions", "data.cold_items",
            "training.best_epoch", "training.epochs_run", "training.device", "cold.cold_item_share"} <= keys
    for key, value, text in parser.found:
        if key.startswith(("gate.", "live.")):
            continue
        assert value == _lookup(metrics, key), key
        if isinstance(value, float) and key not in ("cold.cold_item_share",):
            assert text == f"{value:.4f}", key
    assert _lookup(metrics, "data.cold_items") == len(COLD_ITEMS)

    # The verdict says how the model compares with popularity, as the numbers do.
    better = metrics["recall_at_5"] > metrics["popularity_recall_at_5"]
    assert f'data-verdict="{"good" if better else "bad"}"' in shown.dom

    # Sample users: their history and their list, with the items' titles (escaped, not markup).
    users = re.findall(r'<div class="user" data-user="([^"]+)">(.*?)</table>', shown.dom, flags=re.S)
    assert 3 <= len(users) <= 5
    recs = pd.read_parquet(run_dir / "recommendations.parquet")
    for user, body in users:
        listed = recs[recs["user_id"] == user].sort_values("rank")["item_id"].tolist()
        assert re.findall(r'<span class="note">([^<]+)</span>', body.split("<b>List</b>")[1]) == listed
        assert "Title of" in body and "&amp; &lt;co&gt;" in body and "<co>" not in body


def test_topx_report_rebuilds_the_page_from_a_run_directory(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    page = run_dir / "report.html"
    before = page.read_text(encoding="utf-8")
    page.unlink()
    assert main(["report", str(run_dir), "--no-open"]) == 0
    assert f"report: {page.resolve()}" in capsys.readouterr().out
    # The items table the run read is found again, titles and all.
    assert page.read_text(encoding="utf-8") == before


def test_topx_report_refuses_a_directory_that_is_no_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path), "--no-open"]) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert main(["report", "--no-open"]) == 2


def test_the_page_stays_small_for_a_million_users() -> None:
    """Plots summarise: a million users and their lists make a page as small as a thousand do."""
    sizes = {}
    for n_users in (1_000, 1_000_000):
        n_items = 20_000
        rng = np.random.default_rng(0)
        index = SimpleNamespace(n_users=n_users, n_items=n_items, n_warm_users=n_users - 10, n_warm_items=n_items - 5,
                                user_ids=tuple(f"u{i}" for i in range(n_users)),
                                item_ids=tuple(f"i{i}" for i in range(n_items)))
        users = rng.integers(0, n_users - 10, 3 * n_users)
        items = np.minimum(rng.zipf(1.3, 3 * n_users) - 1, n_items - 1)
        x = 3

        def lists(n_users: int = n_users, n_items: int = n_items, x: int = x, rng: np.random.Generator = rng) -> Any:
            for start in range(0, n_users, 250_000):
                stop = min(start + 250_000, n_users)
                count = stop - start
                yield pd.DataFrame({
                    "user_id": np.repeat([f"u{i}" for i in range(start, stop)], x),
                    "rank": np.tile(np.arange(1, x + 1), count),
                    "item_id": [f"i{i}" for i in rng.integers(0, n_items, count * x)],
                    "score": rng.normal(size=count * x), "cold_user": np.repeat(np.arange(start, stop) >= n_users - 10, x)})

        metrics = {"top_x": x, "recall_at_3": 0.2, "popularity_recall_at_3": 0.1, "hyperparameters": {"seed": 1}}
        page = build_report(metrics, index, [(users, items)], lists(), title="big", expected_rows=n_users * x)
        sizes[n_users] = len(page.encode())
        assert page.count('class="user"') == 5
    assert sizes[1_000_000] < 2_000_000
    assert sizes[1_000_000] < 1.2 * sizes[1_000]


def test_the_training_section_says_what_the_search_of_settings_found() -> None:
    from topx.report.html import _training_section

    kept = {"mode": "auto", "changed": False, "chosen": {"unobserved_weight": 5.0, "linear_wd": 10.0},
            "best_point": {"unobserved_weight": 10.0, "linear_wd": 1.0}, "gain": 0.015, "min_gain": 0.03,
            "trials": [{}] * 6}
    page = _training_section({"training": {}, "tuning": kept})
    assert "Before training, 6 settings tried on a carve of the training rows (auto)" in page
    assert "kept the given settings (unobserved_weight 5, linear_wd 10)" in page
    assert "unobserved_weight 10, linear_wd 1, was" in page and 'data-metric="tuning.gain"' in page
    assert "1.5%" in page and "under the 3.0% a change needs" in page
    chose = {**kept, "changed": True, "chosen": kept["best_point"], "gain": 0.07}
    assert "chose unobserved_weight 10, linear_wd 1" in _training_section({"training": {}, "tuning": chose})
    assert "Before training" not in _training_section({"training": {}})
    best = {**kept, "best_point": kept["chosen"], "gain": 0.0}
    assert "kept the given settings (unobserved_weight 5, linear_wd 10), which scored best there" in \
        _training_section({"training": {}, "tuning": best})


def test_the_data_section_says_how_much_more_recent_interactions_weighed(monkeypatch) -> None:
    from topx.report import html as report_html

    monkeypatch.setattr(report_html, "_long_tail", lambda data: "")  # the plot is not what is tested here
    _data_section = report_html._data_section
    data = {"n_users": 3, "n_items": 4, "n_interactions": 9, "density": 0.75, "median_per_user": 3,
            "median_per_item": 2, "top_10pct_items_share": 0.4, "cold_users": 0, "cold_items": 0}
    metrics = {"holdout_split": "temporal", "n_holdout": 3, "n_train": 6}
    page = _data_section(data, {**metrics, "recency_boost": 0.75})
    assert "(temporal split)" in page and "the latest weighed 1.75 times the earliest" in page
    assert "Recency boost" not in _data_section(data, {**metrics, "recency_boost": 0.0})
