"""Ray Serve application: the OpenAI-Videos-shaped HTTP API (Ingress), Preprocessor, the
multi-rank DiT replica and the Decoder, with a durable job store and result storage.

Import `serve_app.app:build_app` for the application; this package imports Ray.
"""
