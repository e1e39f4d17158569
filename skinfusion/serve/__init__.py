"""The HTTP service behind ``skinfusion serve``: the FastAPI app (``serving``), upload decoding and JSON
(``serving_io``), the API key, upload limit and Prometheus metrics (``serving_guard``), and micro-batching
(``batching``). The offline web page is in ``static/``."""
