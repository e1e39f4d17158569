"""Everything that touches a dataset on disk or the command line: indexing, splits, pipeline and CLI."""


def quiet_tensorflow() -> None:
    """Import TensorFlow now, without its C++ start-up notices (as the ``skinfusion`` commands do).

    Experiment mains call it first: the notices would otherwise interleave with their progress lines.
    """
    from skinfusion.cli.common import import_tensorflow_quietly  # also sets TF_CPP_MIN_LOG_LEVEL=3 unless set

    import_tensorflow_quietly()
