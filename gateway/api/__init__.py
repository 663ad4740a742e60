"""The HTTP API (FastAPI): health, devices and telemetry, events and alarms, the live stream,
service requests (Open311 and the operators'), needs and plans, evaluation, the access log.

`app.create_app` builds it from an `ApiContext`; routers per resource live in `routes/`, every
request and response model in `schemas.py`.
"""
