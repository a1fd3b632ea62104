"""The azure-servicebus SDK's own queue tests, run against our Service Bus emulator.

``python -m local.sdk_suite`` (``make sdk-suite``): see ``__main__.py`` and local/servicebus_emulator/README.md.
Not part of the default test suite: it downloads the SDK's source distribution and takes several minutes (the
upstream tests sleep through lock expiries, keep-alives and link timeouts).
"""
