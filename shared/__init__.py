"""Code shared by the Function App and the GPU worker: settings, message schema, errors and adapters."""
