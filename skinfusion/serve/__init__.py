"""The HTTP service behind ``skinfusion serve``: the FastAPI app (``serving``), upload decoding and JSON
(``serving_io``), the API key, upload limit and Prometheus metrics (``serving_guard``), micro-batching
(``batching``), and the port and uvicorn process around them (``listener``). The offline web page is in ``static/``."""
