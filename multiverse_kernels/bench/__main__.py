"""``python -m multiverse_kernels.bench``: the main job (:mod:`multiverse_kernels.bench.report`)."""

from .report import main

raise SystemExit(main())
