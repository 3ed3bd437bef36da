"""Settings every test module shares.

Hypothesis draws its examples from a fixed seed (``derandomize``) and keeps no database of past
failures, so a property test's outcome is the same on every run and every machine: a failure found once
is a failure every time, and CI never goes red on a draw that a rerun turns green. To hunt for new
counterexamples, run with ``HYPOTHESIS_PROFILE=explore`` (fresh random draws, ten times as many); add
what it finds as an ``@example`` so the fixed runs keep it.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None, max_examples=1500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))
