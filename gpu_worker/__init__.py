"""The GPU worker: ``python -m gpu_worker`` consumes the jobs queue with peek-lock and writes results.

One concept per module:

* ``consumer``    receive in batches -> dispatch -> settle (in one place, in a ``finally``)
* ``settlement``  the pure retry/settlement decision (complete / abandon / dead-letter)
* ``handler``     one job: download the input, analyse, upload the outputs, store the result
* ``deadletters`` marks failed the jobs whose messages the broker dead-lettered by itself
* ``shutdown``    the SIGTERM/SIGINT drain with a grace period
* ``heartbeat``   liveness file for the container's HEALTHCHECK (``python -m gpu_worker --healthcheck``)
* ``analysis``    the analysis itself (torch; never touches Azure)
* ``preemption``  Azure Scheduled Events (Spot ``Preempt``) trigger the same drain
"""
