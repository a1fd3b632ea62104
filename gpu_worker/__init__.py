"""The GPU worker: ``python -m gpu_worker`` consumes the job queues with peek-lock and writes results.

One concept per module:

* ``consumer``    each message: receive -> claim -> download -> analyse -> upload -> settle (in one place)
* ``pipeline``    the threads: the next job's I/O and the last one's overlap the analysis; bounded in flight
* ``inbox``       which queue the next message comes from (``jobs-high`` first, ``jobs`` never starved)
* ``receiver``    a Service Bus receiver shared by threads: one call at a time
* ``settlement``  the pure retry/settlement decision (complete / abandon / dead-letter, stop a cancelled attempt)
* ``attempt``     a claimed attempt's lease, time limit, loss and cancellation
* ``progress``    the attempt's stage and fraction, throttled; every report is a checkpoint
* ``handler``     one job's stages: download the input; analyse; upload the outputs, store the result
* ``settle``      carrying out a settlement: the job's side, then the message's
* ``registry``    this worker's row in ``workers`` (host, device, the job being analysed)
* ``breaker``     stops receiving while PostgreSQL or Blob Storage is down
* ``locks``       which messages lost their lock
* ``shutdown``    the SIGTERM/SIGINT drain with a grace period
* ``heartbeat``   liveness file for the container's HEALTHCHECK (``python -m gpu_worker --healthcheck``)
* ``analysis``    the analysis itself (torch; never touches Azure)
* ``preemption``  Azure Scheduled Events (Spot ``Preempt``) trigger the same drain
"""
