"""The benchmark lab, apart from the library: nothing in the library imports it.

* :mod:`~multiverse_kernels.bench.workloads`: the benchmark forests (one definition, also used by the
  tests' shape generators and the scripts) and the :class:`~multiverse_kernels.bench.workloads.Workload`;
* :mod:`~multiverse_kernels.bench.peers`: what a user would otherwise run, and the bytes-read tally;
* :mod:`~multiverse_kernels.bench.timing`: one timer (CPU wall clock with flushed caches, CUDA graphs
  and events), copy bandwidth;
* :mod:`~multiverse_kernels.bench.roofline`: the machine's limits measured in the same run;
* :mod:`~multiverse_kernels.bench.report`: the main job (``python -m multiverse_kernels.bench``);
* :mod:`~multiverse_kernels.bench.sweep`: sweeps, JSON and plots;
* :mod:`~multiverse_kernels.bench.ncu`: DRAM bytes from Nsight Compute on a GPU;
* :mod:`~multiverse_kernels.bench.gpu_run`: the GPU entry point (``python -m multiverse_kernels.gpu_run``).
"""
