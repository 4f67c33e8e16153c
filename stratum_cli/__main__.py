"""``python -m stratum_cli``: the ``stratum`` command."""
from __future__ import annotations

from stratum_cli.main import main

raise SystemExit(main())
