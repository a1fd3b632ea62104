"""``crop-ai``: the command-line client of the Crop AI API.

    crop-ai submit FILE... [--wait] [--priority high|normal] [--callback-url URL] [--callback-events E,E]
                           [--bands B02,B03,...] [--analysis crop-health|model:NAME] [--scale N] [--idempotency-key K]
    crop-ai status ID | cancel ID | retry ID | batch ID | download ID DIR
    crop-ai list [--status S] [--analysis A] [--batch ID] [--created-after T] [--created-before T] [--limit N]
                 [--next CURSOR]
    crop-ai stats | health | dlq list [--reason R] [--action A] [--limit N] | dlq replay [--reason R] [--limit N]

Global options (before or after the command): ``--api-url`` (env ``CROP_AI_API_URL``, default
``http://127.0.0.1:7071``), ``--function-key`` (env ``CROP_AI_FUNCTION_KEY``, sent as ``x-functions-key``),
``--json`` (stdout gets the API's JSON exactly as it answered; a problem's JSON too).

Exit codes (:class:`cli.errors.ExitCode`): 0 ok; 1 a job ended failed or cancelled (``--wait``) or has nothing to
download; 2 bad command line; 3 the API refused the request (a 4xx problem); 4 the API is unavailable or failed (a
5xx problem, or ``health`` not ok); 5 the API could not be reached or answered something else; 6 ``--wait`` timed
out; 130 interrupted.

Modules: :mod:`cli.args` (the command line), :mod:`cli.api` (HTTP), :mod:`cli.commands` (one function per
command), :mod:`cli.render` (rich output), :mod:`cli.watch` (``--wait``'s progress), :mod:`cli.errors`.
"""
