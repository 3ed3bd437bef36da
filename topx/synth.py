"""A synthetic catalogue with planted structure, for the demo, tests and benchmarks.

Items have power-law popularity, a category, tags and a price; users have an age band and a
country. Each user and item carries a hidden taste vector, and a share of it is explained by
the side features, so a model that uses features has something real to find. Users choose
items with probability proportional to popularity * exp(taste affinity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CATEGORIES = ("books", "music", "film", "games", "garden", "kitchen", "sport", "toys")
TAGS = ("new", "classic", "gift", "eco", "premium", "budget", "family", "indie", "bestseller", "local")
COUNTRIES = ("de", "fr", "gb", "es", "it", "nl", "pl", "se")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")


@dataclass(frozen=True)
class SyntheticData:
    interactions: pd.DataFrame  # user_id, item_id, rating (explicit 1..5) or plays (implicit count)
    users: pd.DataFrame         # user_id, age_band, country
    items: pd.DataFrame         # item_id, category, tags (a|b), price

    def write(self, directory: str | Path) -> dict[str, Path]:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"interactions": out / "interactions.csv", "users": out / "users.csv", "items": out / "items.csv"}
        self.interactions.to_csv(paths["interactions"], index=False)
        self.users.to_csv(paths["users"], index=False)
        self.items.to_csv(paths["items"], index=False)
        return paths


def generate(
    n_users: int = 3000,
    n_items: int = 1500,
    mean_interactions: float = 25.0,
    *,
    k: int = 8,
    implicit: bool = True,
    seed: int = 7,
) -> SyntheticData:
    """Generate interactions: implicit play counts (``plays``) or explicit ratings 1..5 (``rating``)."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, len(CATEGORIES), n_items)
    country = rng.integers(0, len(COUNTRIES), n_users)
    age = rng.integers(0, len(AGE_BANDS), n_users)
    cat_taste = rng.normal(0, 1, (len(CATEGORIES), k))
    country_taste = rng.normal(0, 1, (len(COUNTRIES), k))
    age_taste = rng.normal(0, 1, (len(AGE_BANDS), k))
    item_taste = 0.7 * cat_taste[cat] + 0.7 * rng.normal(0, 1, (n_items, k))
    user_taste = 0.5 * country_taste[country] + 0.5 * age_taste[age] + 0.7 * rng.normal(0, 1, (n_users, k))
    # Scale so that affinities have unit spread: taste then moves an item's odds about as much
    # as a few steps along the popularity curve.
    scale = np.sqrt(np.std(item_taste[:200] @ user_taste[:200].T))
    item_taste /= scale
    user_taste /= scale
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    popularity = popularity[rng.permutation(n_items)]
    log_pop = np.log(popularity)

    counts = np.clip(rng.lognormal(np.log(mean_interactions), 0.6, n_users).astype(int), 3, n_items // 2)
    user_list, item_list, value_list = [], [], []
    for u in range(n_users):
        affinity = item_taste @ user_taste[u]
        logits = log_pop + 1.5 * affinity
        gumbel = rng.gumbel(size=n_items)
        chosen = np.argpartition(-(logits + gumbel), counts[u])[: counts[u]]
        user_list.append(np.full(len(chosen), u))
        item_list.append(chosen)
        if implicit:
            value_list.append(1 + rng.poisson(np.exp(0.5 + 0.5 * affinity[chosen]).clip(0, 50)))
        else:
            raw = 3.4 + 0.8 * affinity[chosen] + rng.normal(0, 0.7, len(chosen))
            value_list.append(np.clip(np.rint(raw), 1, 5).astype(int))
    users = np.concatenate(user_list)
    items = np.concatenate(item_list)
    values = np.concatenate(value_list)
    order = rng.permutation(len(users))
    value_name = "plays" if implicit else "rating"
    interactions = pd.DataFrame({
        "user_id": [f"u{u:05d}" for u in users[order]],
        "item_id": [f"i{i:05d}" for i in items[order]],
        value_name: values[order],
    })
    tag_sets = []
    for _i in range(n_items):
        n_tags = rng.integers(1, 4)
        tag_sets.append("|".join(sorted(rng.choice(TAGS, size=n_tags, replace=False))))
    item_table = pd.DataFrame({
        "item_id": [f"i{i:05d}" for i in range(n_items)],
        "category": [CATEGORIES[c] for c in cat],
        "tags": tag_sets,
        "price": np.round(rng.lognormal(3.0, 0.8, n_items), 2),
    })
    user_table = pd.DataFrame({
        "user_id": [f"u{u:05d}" for u in range(n_users)],
        "age_band": [AGE_BANDS[a] for a in age],
        "country": [COUNTRIES[c] for c in country],
    })
    return SyntheticData(interactions, user_table, item_table)
