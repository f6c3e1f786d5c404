"""The site's imputation service (``fediim serve``) and the engine it shares with
``fediim impute --site-config``: the bank verified and the models built once, rows imputed
per request, with metrics, quality and drift monitoring and a status page.

Importing this package loads no web framework: :mod:`fediim.serve.app` does (FastAPI,
uvicorn, prometheus-client), and only ``fediim serve`` imports it.
"""
