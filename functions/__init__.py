"""HTTP Functions (blueprints) registered by ``function_app.py``: thin adapters from HTTP to :mod:`shared`."""
