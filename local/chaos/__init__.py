"""``python -m local.chaos`` (``make chaos``): a chaos run on the local stack that proves the job lifecycle loses
nothing.

It starts the stack as ``local.stack up`` does (2 workers, the timer reconciler in the Functions host, settings tuned
so healing happens within the run), submits jobs over HTTP as a good client does (every 4th by reference to a blob
of the images container), and meanwhile SIGKILLs and SIGTERMs workers, restarts the Service Bus emulator, SIGKILLs
the Functions host with submits in flight, takes Azurite and PostgreSQL down for minutes, and leaves jobs exactly as
a host killed between insert and send leaves them. Then it waits until every job is terminal and prints one JSON
report: nothing stuck, lost, run twice or failed.

Modules: :mod:`~local.chaos.timeline` (the plan, as data), :mod:`~local.chaos.supervisor` (the stack's processes),
:mod:`~local.chaos.faults` (the timeline, carried out), :mod:`~local.chaos.client` (the submitting client),
:mod:`~local.chaos.orphans`, :mod:`~local.chaos.collect` and :mod:`~local.chaos.report` (the verdict, pure),
:mod:`~local.chaos.run` (one run).
"""
