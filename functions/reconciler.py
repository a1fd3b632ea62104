"""``reconcile_jobs``: the timer-triggered reconciler (:mod:`shared.reconciler` does the work).

Schedule: the NCRONTAB in the app setting ``RECONCILE_SCHEDULE`` (every minute by default; the host resolves
``%NAME%`` from the app settings). Timer functions are singletons across the Function App's instances (the host
holds a blob lease), so runs never overlap; a run that starts late (``past_due``) reconciles the same way. It
needs no worker: with the scale set at zero, orphaned jobs are still handed over, and their messages scale it out.
It also flushes the webhook events of the jobs it fails or cancels, sweeps events a notifier left unsent, and sends
again a stalled delivery's next attempt (due longer ago than ``WEBHOOK_BACKOFF_MAX`` plus a margin).
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions import deps
from shared.reconciler import STALL_MARGIN, Policy, Reconciler

bp = func.Blueprint()  # type: ignore[no-untyped-call]
log = logging.getLogger(__name__)


@bp.function_name("reconcile_jobs")
@bp.timer_trigger(schedule="%RECONCILE_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
def reconcile_jobs(timer: func.TimerRequest) -> None:
    if timer.past_due:
        log.warning("reconciler run is past due", extra={"action": "reconcile_past_due"})
    d = deps.get()
    policy = Policy(
        resend_after=d.settings.reconcile_resend_after,
        max_attempts=d.settings.job_max_attempts,
        batch=d.settings.reconcile_batch,
        abort_after=d.settings.reconcile_abort_after,
        events_stalled_after=d.settings.webhook_backoff_max + STALL_MARGIN,
    )
    with d.dead_letters() as inbox:
        Reconciler(d.jobs, d.blobs, d.publisher, inbox, policy, outbox=d.notifier).run()
