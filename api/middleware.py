"""`TokenMeterMiddleware` lives in the library (meter/asgi.py, importable without FastAPI);
re-exported here for the code that imported it from `api.middleware`."""

from meter.asgi import AccountOf, TokenMeterMiddleware, TokensOf, headers_of

__all__ = ["AccountOf", "TokenMeterMiddleware", "TokensOf", "headers_of"]
