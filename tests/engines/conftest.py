"""The engine tests reuse the pipelines tests' helpers (sink flags, reading a run's summary)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
