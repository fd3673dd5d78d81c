"""``python -m multiverse_kernels.gpu_run``: the GPU entry point, kept at this name for lent machines and
docs. The code is :mod:`multiverse_kernels.bench.gpu_run` (the lab); this module only runs it."""

from .bench.gpu_run import main

if __name__ == "__main__":
    raise SystemExit(main())
