"""Parameters for cold users and items: entities a feature table lists but no interaction mentions.

Training never sees them (topx.steps leaves their rows out), so their id features keep their initial
values. Left so, a cold item would be scored by its side features' parameters alone; but those learn
only what the id features did not already explain, and on MovieLens they alone never lift a new film
into anyone's top 10. So, after training, each cold entity's id parameters are mapped from its side
features, the way "Learning Attribute-to-Feature Mappings for Cold-Start Recommendations" (Gantner et
al., ICDM 2010) maps attributes to factors: a ridge regression, fitted on the warm entities of the same
side, from [side features, 1] to the id feature's parameters [v_id, w_id]. A cold item then scores as
the warm items that share its features do, on average. The model stays an FM over the same N features
(only rows of V and w that training left untouched are set), so the recipe stays exact.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from topx.feature_index import FeatureIndex
from topx.params import FMParams

# The ridge penalty, relative to the mean diagonal of the warm entities' feature Gramian.
RIDGE = 1e-2


def map_cold_parameters(params: FMParams, index: FeatureIndex) -> FMParams:
    """``params`` with every cold user's and item's id parameters mapped from its side features
    (unchanged when there are no cold entities)."""
    linear, factors = params.linear.copy(), params.factors.copy()
    for owner, cold, warm, first_id in (("user", index.cold_users, index.n_warm_users, 0),
                                         ("item", index.cold_items, index.n_warm_items, index.n_users)):
        if cold == 0:
            continue
        side, _ = index.side_features(owner)
        # Sparse [features, 1]: only the (features + 1)^2 Gramian is dense, never entities x features.
        design = sp.hstack([side.astype(np.float64), np.ones((side.shape[0], 1))], format="csr")
        warm_design = design[:warm]
        ids = np.arange(first_id, first_id + warm + cold)
        target = np.hstack([factors[ids[:warm]].astype(np.float64), linear[ids[:warm], None].astype(np.float64)])
        gram = (warm_design.T @ warm_design).toarray()
        penalty = RIDGE * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(gram.shape[0])
        penalty[-1, -1] = 0.0  # the intercept (the warm entities' mean) is not shrunk
        mapping = np.linalg.solve(gram + penalty + 1e-12 * np.eye(gram.shape[0]), warm_design.T @ target)
        mapped = design[warm:] @ mapping
        factors[ids[warm:]] = mapped[:, :-1].astype(factors.dtype)
        linear[ids[warm:]] = mapped[:, -1].astype(linear.dtype)
    return FMParams(params.bias, linear, factors, params.predictor_type)
