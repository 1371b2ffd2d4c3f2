"""``python -m orbion_common.cli``: the same as the ``orbion`` script (``orbion up`` uses it)."""

from orbion_common.cli import main

raise SystemExit(main())
