"""Item eligibility: which items may be recommended, by their attributes and by id, applied exactly.

A filter file (JSON) names the rules; docs/FORMATS.md specifies it. For example::

    {
      "items": {
        "include": [{"column": "category", "in": ["books", "games"]},
                    {"column": "price", "between": [5, 50]}],
        "exclude": [{"column": "in_stock", "equals": false},
                    {"column": "status", "not_in": ["active"]}],
        "exclude_ids": ["sku-0042"]
      }
    }

An item is eligible when it meets every ``include`` rule, no ``exclude`` rule, and is not in
``exclude_ids``. Rules read the columns of the items table (``--items``); an item the table does not
list has no attribute values, so it meets no rule. The whole file is checked before any work: an
unknown key, column or operator, a value of the wrong type for its column, or rules that leave no
item eligible are errors naming the rule and the field.

The search applies eligibility exactly: it searches the eligible items only (``restrict``), so the top
x is the best x eligible unseen items by the FM's score, as brute force over eligible items gives it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from topx.contract import LIST_NAME_RE
from topx.errors import ConfigError

OPERATORS = ("equals", "in", "not_in", "between")
_TOP_KEYS = ("items", "lists")
_ITEM_KEYS = ("include", "exclude", "exclude_ids", "max_per")


@dataclass(frozen=True)
class Rule:
    """One rule: ``column`` ``operator`` ``value``; ``where`` names it in errors (``items.exclude[1]``)."""

    column: str
    operator: str
    value: Any
    where: str


@dataclass(frozen=True)
class ItemFilter:
    include: tuple[Rule, ...] = ()
    exclude: tuple[Rule, ...] = ()
    exclude_ids: frozenset[str] = frozenset()
    # Diversity: at most ``count`` items of a list share a value of ``column`` (None: no cap).
    max_per: tuple[str, int] | None = None
    # Named lists, (name, its filter) in file order: each is a separate list per user, with its own rules
    # on top of these (its max_per, when it has one, in place of this one's).
    lists: tuple[tuple[str, ItemFilter], ...] = ()
    # What errors call this filter: "items", or "lists.<name>".
    where: str = "items"

    @property
    def columns(self) -> set[str]:
        rules = {rule.column for rule in (*self.include, *self.exclude)}
        own = rules | ({self.max_per[0]} if self.max_per else set())
        return own.union(*(named.columns for _, named in self.lists))


def load_filters(path: str | Path) -> ItemFilter:
    """Read and check a filter file's structure (the columns are checked against the items table by
    ``eligible_items``)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the filter file: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: the filter file is not valid JSON: {exc}") from exc
    return parse_filters(doc, str(path))


def parse_filters(doc: Any, source: str = "filters") -> ItemFilter:
    if not isinstance(doc, dict) or set(doc) - set(_TOP_KEYS):
        unknown = sorted(set(doc) - set(_TOP_KEYS)) if isinstance(doc, dict) else None
        raise ConfigError(f"{source}: a filter file is a JSON object with the keys {' and '.join(_TOP_KEYS)}"
                          + (f"; unknown keys {unknown}" if unknown else ""))
    top = _item_filter(doc.get("items", {}), "items", source)
    named = doc.get("lists", {})
    if not isinstance(named, dict):
        raise ConfigError(f"{source}: 'lists' is an object naming each list's rules")
    lists = []
    for name, raw in named.items():
        if not LIST_NAME_RE.fullmatch(name):
            raise ConfigError(f"{source}: lists: {name!r} is not a list name (1-64 of a-z, 0-9, '-' and '_', "
                              "starting with a letter or digit)")
        own = _item_filter(raw, f"lists.{name}", source)
        lists.append((name, ItemFilter(top.include + own.include, top.exclude + own.exclude,
                                       top.exclude_ids | own.exclude_ids, own.max_per or top.max_per,
                                       where=own.where)))
    return replace(top, lists=tuple(lists))


def _item_filter(items: Any, where: str, source: str) -> ItemFilter:
    """The rules of ``items`` (the file's "items" object, or a named list's)."""
    if not isinstance(items, dict) or set(items) - set(_ITEM_KEYS):
        unknown = sorted(set(items) - set(_ITEM_KEYS)) if isinstance(items, dict) else None
        raise ConfigError(f"{source}: '{where}' is an object with keys {', '.join(_ITEM_KEYS)}"
                          + (f"; unknown keys {unknown}" if unknown else ""))
    rules = {kind: tuple(_rule(r, f"{where}.{kind}[{i}]", source)
                         for i, r in enumerate(_list(items, kind, where, source)))
             for kind in ("include", "exclude")}
    ids = _list(items, "exclude_ids", where, source)
    if not all(isinstance(i, str | int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{source}: {where}.exclude_ids must list item ids (strings)")
    return ItemFilter(rules["include"], rules["exclude"], frozenset(str(i) for i in ids),
                      _max_per(items.get("max_per"), where, source), where=where)


def _max_per(raw: Any, where: str, source: str) -> tuple[str, int] | None:
    if raw is None:
        return None
    if not (isinstance(raw, dict) and set(raw) == {"column", "count"} and isinstance(raw["column"], str)
            and isinstance(raw["count"], int) and not isinstance(raw["count"], bool) and raw["count"] >= 1):
        raise ConfigError(f"{source}: {where}.max_per must be {{\"column\": NAME, \"count\": N}} with N >= 1, "
                          f"got {raw!r}")
    return raw["column"], raw["count"]


def _list(items: dict[str, Any], key: str, where: str, source: str) -> list[Any]:
    value = items.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {where}.{key} must be a list")
    return value


def _rule(raw: Any, where: str, source: str) -> Rule:
    if not isinstance(raw, dict) or "column" not in raw:
        raise ConfigError(f"{source}: {where}: a rule is an object with 'column' and one of {', '.join(OPERATORS)}")
    operators = [key for key in raw if key != "column"]
    unknown = [key for key in operators if key not in OPERATORS]
    if unknown or len(operators) != 1:
        raise ConfigError(f"{source}: {where}: a rule takes exactly one operator of {', '.join(OPERATORS)}, got "
                          f"{operators}")
    column, operator = raw["column"], operators[0]
    if not isinstance(column, str) or not column:
        raise ConfigError(f"{source}: {where}.column must be a column name")
    value = raw[operator]
    if operator in ("in", "not_in") and (not isinstance(value, list) or not value):
        raise ConfigError(f"{source}: {where}.{operator} must be a non-empty list of values")
    if operator == "between" and not (isinstance(value, list) and len(value) == 2
                                      and all(_is_number(v) for v in value) and value[0] <= value[1]):
        raise ConfigError(f"{source}: {where}.between must be [low, high], two numbers with low <= high")
    if operator == "equals" and isinstance(value, list | dict):
        raise ConfigError(f"{source}: {where}.equals must be one value (use 'in' for several)")
    return Rule(column, operator, value, f"{source}: {where}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def eligible_items(item_filter: ItemFilter, item_ids: tuple[str, ...] | list[str],
                   table: pd.DataFrame | None) -> np.ndarray:
    """(n_items,) bool: which of ``item_ids`` the filter lets through. ``table``: the items table
    (indexed by item id, as ``topx.ingest.read_feature_table`` reads it), needed when a rule reads a
    column. Raises ``ConfigError`` naming the rule when its column is unknown or its value cannot be
    compared with the column's, and when no item is left."""
    ids = pd.Index([str(i) for i in item_ids], dtype=object)
    keep = ~ids.isin(list(item_filter.exclude_ids))
    rules = (*item_filter.include, *item_filter.exclude)
    if rules and table is None:
        raise ConfigError(f"{rules[0].where}: rules on columns need the items table (--items)")
    if table is not None:
        rows = pd.Index(table.index.astype(str), dtype=object).get_indexer(ids)
        for rule in item_filter.include:
            keep &= _matches(rule, table, rows)
        for rule in item_filter.exclude:
            keep &= ~_matches(rule, table, rows)
    if not keep.any():
        what = "the filters" if item_filter.where == "items" else f"the filters of {item_filter.where}"
        raise ConfigError(f"{what} leave no item eligible: nothing could be recommended")
    return np.asarray(keep, dtype=bool)


def item_groups(item_filter: ItemFilter, item_ids: tuple[str, ...] | list[str],
                table: pd.DataFrame | None) -> tuple[np.ndarray, int] | None:
    """For ``max_per``: each item's group (a code per value of the column; -1 for an item with no
    value, which no cap limits) and the cap; None without ``max_per``."""
    if item_filter.max_per is None:
        return None
    column, count = item_filter.max_per
    where = f"filters: {item_filter.where}.max_per"
    if table is None:
        raise ConfigError(f"{where}: a cap per column value needs the items table (--items)")
    if column not in table.columns:
        raise ConfigError(f"{where}: the items table has no column {column!r} (it has "
                          f"{', '.join(map(str, table.columns))})")
    values = table[column]
    text = values.astype(str).str.strip().str.lower().where(values.notna())
    codes, _ = pd.factorize(text)
    rows = pd.Index(table.index.astype(str), dtype=object).get_indexer(pd.Index([str(i) for i in item_ids]))
    groups = np.full(len(rows), -1, dtype=np.int64)
    groups[rows >= 0] = codes[rows[rows >= 0]]
    return groups, count


def _matches(rule: Rule, table: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """(n,) bool per item: whether its attribute meets ``rule``; an item without a row or a value, never."""
    if rule.column not in table.columns:
        raise ConfigError(f"{rule.where}: the items table has no column {rule.column!r} (it has "
                          f"{', '.join(map(str, table.columns))})")
    column = table[rule.column]
    numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
    values = list(rule.value) if rule.operator in ("in", "not_in", "between") else [rule.value]
    if numeric and not all(_is_number(v) for v in values):
        raise ConfigError(f"{rule.where}: column {rule.column!r} holds numbers; {rule.operator} "
                          f"{rule.value!r} does not compare with them")
    if rule.operator == "between" and not numeric:
        raise ConfigError(f"{rule.where}: 'between' needs a numeric column; {rule.column!r} is not")
    present = column.notna().to_numpy()
    if numeric:
        data = column.to_numpy(dtype=np.float64, na_value=np.nan)
        if rule.operator == "between":
            hit = (data >= values[0]) & (data <= values[1])
        else:
            hit = np.isin(data, np.asarray(values, dtype=np.float64))
    else:
        text = column.astype(str).str.strip().str.lower().to_numpy()
        wanted = np.asarray([_as_text(v) for v in values], dtype=object)
        hit = np.isin(text, wanted)
    hit &= present
    if rule.operator == "not_in":
        hit = ~hit & present
    out = np.zeros(len(rows), dtype=bool)
    known = rows >= 0
    out[known] = hit[rows[known]]
    return out


def _as_text(value: Any) -> str:
    """A rule's value as the items table's text reads it: booleans as true/false, case-insensitive."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()


def restrict(item_vectors: np.ndarray, seen: Any, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """The catalogue cut to the eligible items: their rows (n_eligible,), their vectors, and the seen
    matrix's columns for them (None stays None). A search over these is a search over eligible items
    alone; ``rows[found]`` maps its results back to item rows."""
    import scipy.sparse as sp

    rows = np.flatnonzero(eligible)
    return rows, np.ascontiguousarray(item_vectors[rows]), None if seen is None else sp.csr_matrix(seen)[:, rows]


def read_responses(source: str, user_ids: Any, item_ids: Any, *, s3_client: Any = None) -> Any:
    """(n_users, n_items) CSR of the (user, item) pairs in a responses table: items a user dismissed,
    bought elsewhere or was already sent, to leave out of their next lists as seen items are. The table
    has ``user_id`` and ``item_id`` columns (others, such as a time, are ignored); a file, folder or S3
    prefix as ``--interactions`` takes. Pairs naming a user or an item the run does not know are skipped."""
    import scipy.sparse as sp

    from topx.ingest import read_interactions

    frame = read_interactions(source, rating_col=None, implicit=True, s3_client=s3_client)
    users = pd.Index([str(u) for u in user_ids], dtype=object).get_indexer(frame["user_id"].astype(str))
    items = pd.Index([str(i) for i in item_ids], dtype=object).get_indexer(frame["item_id"].astype(str))
    known = (users >= 0) & (items >= 0)
    out = sp.csr_matrix((np.ones(int(known.sum()), np.float32), (users[known], items[known])),
                        shape=(len(user_ids), len(item_ids)))
    out.sum_duplicates()
    out.data[:] = 1.0
    return out


def exclude_also(seen: Any, dismissed: Any) -> Any:
    """The seen matrix with the ``dismissed`` pairs (same shape) added: what the search leaves out."""
    return dismissed if seen is None else ((seen + dismissed) > 0).astype(np.float32).tocsr()



@dataclass(frozen=True)
class ResolvedList:
    """One list the filters ask for, resolved against the catalogue: ``name`` None for the default list;
    ``eligible`` (n_items,) bool; ``diversity`` each item's group and the cap, or None."""

    name: str | None
    eligible: np.ndarray
    diversity: tuple[np.ndarray, int] | None


def resolve_lists(item_filter: ItemFilter, item_ids: tuple[str, ...] | list[str],
                  table: pd.DataFrame | None) -> list[ResolvedList]:
    """The default list first, then each named list in file order; every rule is checked against the
    items table here (``eligible_items``, ``item_groups``), before any work."""
    return [ResolvedList(name, eligible_items(rules, item_ids, table), item_groups(rules, item_ids, table))
            for name, rules in ((None, item_filter), *item_filter.lists)]
