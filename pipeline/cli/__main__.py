"""``python -m pipeline.cli``: the same as the ``spotlane`` command."""

from pipeline.cli import main

main()
