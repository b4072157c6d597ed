"""Settings for every test."""

from __future__ import annotations

import os

from hypothesis import settings

# CI runs the property tests on a fixed seed, so a run there is repeatable and
# a red CI names a case anyone can replay; developers' runs keep exploring
# new examples (and hypothesis keeps the failing ones in .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
