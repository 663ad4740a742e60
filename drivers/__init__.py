"""Protocol drivers: each turns one field protocol into contract-shaped messages for the pipeline.

See `drivers.base` for the interface; a new protocol is one new module here.
"""
