"""`dsv2 serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the slot engine.

Files in the order a request flows through them:
    prepare.py    body -> validated request (schemas.py) -> prompt ids -> jobs; every 4xx (errors.py)
    scheduler.py  continuous batching on an engine thread: admit, step, retire, cancel
    app.py        routes, SSE streaming, API key; metrics.py renders /metrics
    launch.py     checkpoint -> engine -> app; ServerThread for tests;  cli.py: the `serve` verb
"""
