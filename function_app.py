"""The Function App: wiring only. Handlers live in ``functions/`` (blueprints); dependencies are built on the first
request (``functions/deps.py``), so importing this module reads no setting and opens no connection. It sets the Azure
SDKs' log level (WARNING: see ``shared/logs.py``), which ``host.json`` cannot."""

import azure.functions as func

from functions.batches import bp as batches_bp
from functions.control import bp as control_bp
from functions.dead_letters import bp as dead_letters_bp
from functions.health import bp as health_bp
from functions.listing import bp as listing_bp
from functions.openapi import bp as openapi_bp
from functions.reconciler import bp as reconciler_bp
from functions.stats import bp as stats_bp
from functions.status import bp as status_bp
from functions.submit import bp as submit_bp
from functions.uploads import bp as uploads_bp
from functions.webhooks import bp as webhooks_bp
from shared.logs import quiet_azure_sdks

quiet_azure_sdks()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(submit_bp)
app.register_functions(uploads_bp)
app.register_functions(status_bp)
app.register_functions(control_bp)
app.register_functions(batches_bp)
app.register_functions(dead_letters_bp)
app.register_functions(listing_bp)
app.register_functions(stats_bp)
app.register_functions(health_bp)
app.register_functions(openapi_bp)
app.register_functions(reconciler_bp)
app.register_functions(webhooks_bp)
