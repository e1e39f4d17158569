"""Run-directory workflows behind the CLI: split, train, fuse, evaluate, audit, out-of-fold stacking, reports."""
