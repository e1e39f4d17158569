"""Everything that touches a dataset on disk or the command line: indexing, splits, pipeline and CLI."""
