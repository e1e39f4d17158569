"""Run-directory workflows behind the CLI: split, train, fuse, evaluate, audit, adapt, explain, export,
predict, out-of-fold stacking, reports. The HTTP service is ``skinfusion.serve``; the benchmarks are
``skinfusion.bench``."""
