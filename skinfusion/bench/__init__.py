"""Benchmarks behind ``skinfusion bench`` and ``bench-serve``: in-process inference (``bench``), exported
runtimes (``bench_export``), training throughput (``bench_train``), and the served model under loopback load
(``bench_serve``, with the load generator in ``loadgen``). They report ratios measured side by side in one run."""
