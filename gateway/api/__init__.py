"""The HTTP API (FastAPI): health, devices and telemetry, events and alarms, the live stream.

`app.create_app` builds it from an `ApiContext`; routers per resource live in `routes/`.
"""
