"""Jobs exactly as a Functions host killed between insert and send leaves them: the row inserted
(:meth:`shared.db.PostgresJobStore.create`, ``queued``, generation 1, send unconfirmed), the image stored
(:meth:`shared.storage.BlobStore.put_input`), and no message sent. Nobody retries them: only the reconciler's
``resend`` can hand them over, ``RECONCILE_RESEND_AFTER`` after the insert.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Mapping

from shared.db import PostgresJobStore, open_pool
from shared.geotiff import Limits, inspect
from shared.settings import Settings
from shared.storage import BlobStore
from shared.submission import input_blob_name, job_params

logger = logging.getLogger(__name__)


def create_orphans(env: Mapping[str, str], image: bytes, bands: str, count: int, key_prefix: str) -> list[str]:
    """Create ``count`` such jobs with the services' settings ``env``; their ids."""
    settings = Settings.from_env(env)
    limits = Limits(settings.max_upload_bytes, settings.max_pixels, settings.max_bands)
    params = job_params(inspect(image, limits), bands, None, None)  # what the submit would have stored
    sha256 = hashlib.sha256(image).hexdigest()
    store = BlobStore.from_settings(settings)
    ids = []
    try:
        with open_pool(settings) as pool:
            jobs = PostgresJobStore(pool)
            for index in range(count):
                job_id = uuid.uuid4()
                job, created = jobs.create(
                    job_id=job_id,
                    input_blob=input_blob_name(job_id),
                    input_sha256=sha256,
                    params=params,
                    idempotency_key=f"{key_prefix}-{index:02d}",
                )
                assert created, "a fresh key"
                store.put_input(job.job_id, image, sha256)
                ids.append(str(job.job_id))
                logger.warning("chaos: job %s inserted and stored, never sent", job.job_id, extra={"job_id": job_id})
    finally:
        store.close()
    return ids
