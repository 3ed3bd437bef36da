"""The feature index: which feature each of the model's N rows is, and each user's and item's x.

The model's rows are laid out as: one row per user id (``user_id=<id>``), one per item id
(``item_id=<id>``), then user side features, then item side features (``<column>=<value>`` for a
categorical value, ``<column>`` for a numeric column). ``user_x`` / ``item_x`` are the sparse
design rows of every user and item over those N features: the id one-hot plus the side features.
A training sample for the pair (u, i) is ``x = user_x[u] + item_x[i]``.

On disk (a directory): ``feature_index.json`` (format, names, owners, ids) and ``design.npz``
(the two CSR matrices). Both are documented in docs/FORMATS.md.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from topx.errors import ArtifactFormatError

FORMAT_NAME = "topx-feature-index"
FORMAT_VERSION = 1
INDEX_FILE = "feature_index.json"
DESIGN_FILE = "design.npz"


@dataclass(frozen=True)
class FeatureIndex:
    """names: (N,) feature names; owners: (N,) 'user' or 'item';
    user_x: (n_users, N) float32 CSR; item_x: (n_items, N) float32 CSR."""

    names: tuple[str, ...]
    owners: tuple[str, ...]
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    user_x: sp.csr_matrix
    item_x: sp.csr_matrix
    # Cold users and items: the last ``cold_users`` of user_ids (``cold_items`` of item_ids) have no
    # interactions. Training leaves them out; their id features' parameters are then mapped from their
    # side features (topx.coldstart).
    cold_users: int = 0
    cold_items: int = 0

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (0 <= self.cold_users <= len(self.user_ids) and 0 <= self.cold_items <= len(self.item_ids)):
            raise ArtifactFormatError("feature index: more cold users or items than ids")
        if len(self.owners) != n:
            raise ArtifactFormatError(f"feature index: {len(self.owners)} owners for {n} names")
        if self.user_x.shape != (len(self.user_ids), n):
            raise ArtifactFormatError(
                f"feature index: user_x has shape {self.user_x.shape}, expected ({len(self.user_ids)}, {n})"
            )
        if self.item_x.shape != (len(self.item_ids), n):
            raise ArtifactFormatError(
                f"feature index: item_x has shape {self.item_x.shape}, expected ({len(self.item_ids)}, {n})"
            )

    @property
    def n_features(self) -> int:
        return len(self.names)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_warm_users(self) -> int:
        """Users with interactions (the first rows): the ones training sees."""
        return self.n_users - self.cold_users

    @property
    def n_warm_items(self) -> int:
        """Items with interactions (the first rows): the ones training sees."""
        return self.n_items - self.cold_items

    @classmethod
    def build(
        cls,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        user_features: sp.spmatrix | None = None,
        user_feature_names: Sequence[str] = (),
        item_features: sp.spmatrix | None = None,
        item_feature_names: Sequence[str] = (),
        *,
        cold_users: int = 0,
        cold_items: int = 0,
    ) -> FeatureIndex:
        """Lay out ids and side features. ``user_features``: (n_users, n_uf) aligned with user_ids.
        The last ``cold_users`` user ids (``cold_items`` item ids) are cold: without interactions."""
        n_users, n_items = len(user_ids), len(item_ids)
        n_uf, n_if = len(user_feature_names), len(item_feature_names)
        uf = sp.csr_matrix((n_users, n_uf), dtype=np.float32) if user_features is None else sp.csr_matrix(user_features, dtype=np.float32)
        itf = sp.csr_matrix((n_items, n_if), dtype=np.float32) if item_features is None else sp.csr_matrix(item_features, dtype=np.float32)
        if uf.shape != (n_users, n_uf) or itf.shape != (n_items, n_if):
            raise ArtifactFormatError("feature index: side feature matrices do not match the id and name counts")
        names = (
            [f"user_id={u}" for u in user_ids]
            + [f"item_id={i}" for i in item_ids]
            + list(user_feature_names)
            + list(item_feature_names)
        )
        owners = ["user"] * n_users + ["item"] * n_items + ["user"] * n_uf + ["item"] * n_if
        n = len(names)
        user_x = sp.hstack(
            [
                sp.identity(n_users, dtype=np.float32, format="csr"),
                sp.csr_matrix((n_users, n_items), dtype=np.float32),
                uf,
                sp.csr_matrix((n_users, n_if), dtype=np.float32),
            ],
            format="csr",
        )
        item_x = sp.hstack(
            [
                sp.csr_matrix((n_items, n_users), dtype=np.float32),
                sp.identity(n_items, dtype=np.float32, format="csr"),
                sp.csr_matrix((n_items, n_uf), dtype=np.float32),
                itf,
            ],
            format="csr",
        )
        assert user_x.shape[1] == n
        return cls(tuple(names), tuple(owners), tuple(map(str, user_ids)), tuple(map(str, item_ids)),
                   _clean(user_x), _clean(item_x), cold_users, cold_items)

    def side_features(self, owner: str) -> tuple[sp.csr_matrix, tuple[str, ...]]:
        """(n_entities, n_side) the side features of ``owner`` ('user' or 'item'), without the ids."""
        n_ids = self.n_users + self.n_items
        cols = [j for j in range(n_ids, self.n_features) if self.owners[j] == owner]
        table = self.user_x if owner == "user" else self.item_x
        return table[:, cols], tuple(self.names[j] for j in cols)

    def with_history(self, user_rows: np.ndarray, item_rows: np.ndarray, *, users: bool = True,
                     items: bool = True) -> FeatureIndex:
        """This index plus history features built from the interactions (user_rows[n], item_rows[n]):
        with ``users``, a user feature ``history:item_id=<i>`` per item, each user carrying the items it
        interacted with, weighted 1 / sqrt(count) (as SVD++ and FISM normalise); with ``items``, an
        item feature ``history:user_id=<u>`` per user, the same way round. They are side features of
        their entity, so the recipe stays exact; an entity without interactions has none."""
        pairs = sp.csr_matrix((np.ones(len(user_rows), np.float32), (user_rows, item_rows)),
                              shape=(self.n_users, self.n_items))
        pairs.data[:] = 1.0  # a pair listed twice is still one item of the history

        def normalised(matrix: sp.csr_matrix) -> sp.csr_matrix:
            count = np.diff(matrix.indptr).astype(np.float32)
            scale = np.zeros_like(count)
            scale[count > 0] = 1.0 / np.sqrt(count[count > 0])
            return sp.csr_matrix(sp.diags(scale) @ matrix, dtype=np.float32)

        uf, u_names = self.side_features("user")
        itf, i_names = self.side_features("item")
        if users:
            uf = sp.hstack([uf, normalised(pairs)], format="csr")
            u_names = u_names + tuple(f"history:item_id={i}" for i in self.item_ids)
        if items:
            itf = sp.hstack([itf, normalised(sp.csr_matrix(pairs.T))], format="csr")
            i_names = i_names + tuple(f"history:user_id={u}" for u in self.user_ids)
        return FeatureIndex.build(self.user_ids, self.item_ids, uf, u_names, itf, i_names,
                                  cold_users=self.cold_users, cold_items=self.cold_items)

    @classmethod
    def one_hot(cls, user_ids: Sequence[str], item_ids: Sequence[str]) -> FeatureIndex:
        """The common SageMaker layout: user one-hot rows first, then item one-hot rows."""
        return cls.build(user_ids, item_ids)

    def save(self, directory: str | os.PathLike[str]) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "n_features": self.n_features,
            "features": [{"name": n, "owner": o} for n, o in zip(self.names, self.owners, strict=True)],
            "user_ids": list(self.user_ids),
            "item_ids": list(self.item_ids),
            "cold_users": self.cold_users,
            "cold_items": self.cold_items,
        }
        (out / INDEX_FILE).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        with open(out / DESIGN_FILE, "wb") as fh:
            np.savez_compressed(
                fh,
                user_data=self.user_x.data, user_indices=self.user_x.indices, user_indptr=self.user_x.indptr,
                item_data=self.item_x.data, item_indices=self.item_x.indices, item_indptr=self.item_x.indptr,
            )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> FeatureIndex:
        path = Path(directory)
        index_path = path / INDEX_FILE if path.is_dir() else path
        design_path = index_path.parent / DESIGN_FILE
        try:
            doc = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactFormatError(f"{index_path}: cannot read the feature index: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ArtifactFormatError(f"{index_path}: not a topx feature index (format is {doc.get('format') if isinstance(doc, dict) else None!r})")
        if doc.get("version") != FORMAT_VERSION:
            raise ArtifactFormatError(f"{index_path}: unsupported feature index version {doc.get('version')!r}")
        try:
            names = tuple(str(f["name"]) for f in doc["features"])
            owners = tuple(str(f["owner"]) for f in doc["features"])
            user_ids = tuple(str(u) for u in doc["user_ids"])
            item_ids = tuple(str(i) for i in doc["item_ids"])
            cold_users, cold_items = int(doc.get("cold_users", 0)), int(doc.get("cold_items", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactFormatError(f"{index_path}: feature index is missing {exc}") from exc
        n = len(names)
        if design_path.exists():
            try:
                with np.load(design_path) as z:
                    user_x = sp.csr_matrix((z["user_data"], z["user_indices"], z["user_indptr"]), shape=(len(user_ids), n))
                    item_x = sp.csr_matrix((z["item_data"], z["item_indices"], z["item_indptr"]), shape=(len(item_ids), n))
            # A damaged .npz fails inside zipfile and zlib with their own exception types.
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
                raise ArtifactFormatError(f"{design_path}: cannot read the design matrices: {exc}") from exc
        else:
            # Without design.npz the index describes ids only: each user and item is its id one-hot.
            user_x = _one_hot_rows(names, "user_id=", user_ids, index_path)
            item_x = _one_hot_rows(names, "item_id=", item_ids, index_path)
        return cls(names, owners, user_ids, item_ids, _clean(user_x), _clean(item_x), cold_users, cold_items)


def _one_hot_rows(names: Sequence[str], prefix: str, ids: Sequence[str], source: Path) -> sp.csr_matrix:
    position = {name: j for j, name in enumerate(names)}
    cols = []
    for entity_id in ids:
        j = position.get(prefix + entity_id)
        if j is None:
            raise ArtifactFormatError(f"{source}: no feature named {prefix + entity_id!r}")
        cols.append(j)
    rows = np.arange(len(ids))
    return sp.csr_matrix((np.ones(len(ids), np.float32), (rows, np.asarray(cols))), shape=(len(ids), len(names)))


def _clean(matrix: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(matrix, dtype=np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out
