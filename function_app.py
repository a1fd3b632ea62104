"""The Function App: wiring only. Handlers live in ``functions/`` (blueprints); dependencies are built on the first
request (``functions/deps.py``), so importing this module reads no setting and opens no connection."""

import azure.functions as func

from functions.reconciler import bp as reconciler_bp
from functions.status import bp as status_bp
from functions.submit import bp as submit_bp

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(submit_bp)
app.register_functions(status_bp)
app.register_functions(reconciler_bp)
