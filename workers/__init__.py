"""spotlane's data plane: shard runner, inference engines, micro-batching.

torch and transformers are imported lazily, when an engine is first loaded.
"""

from __future__ import annotations

__all__: list[str] = []
