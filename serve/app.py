"""Entry point for ``serve run serve.app:app [key=value ...]``: settings from args (or ``$EDSR_SERVE_CONFIG``).

Examples (from the repository root)::

    serve run serve.app:app models.edsr_x2=/weights/edsr_baseline_x2.pt models.edsr_x4=s3://edsr/models/x4.pt
    serve run serve.app:app models.mdsr=models:/mdsr_baseline/1 num_gpus=1 max_batch_size=16
    serve run serve.app:app config=serve/settings.yaml auth_token_env=EDSR_SERVE_TOKEN

Every key is a field of :class:`edsr_ray.serving.ServeSettings`; an unknown key or a bad value stops before anything
is deployed, with the key named. ``serve/config.yaml`` (for ``serve deploy``) points at the same builder.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from edsr_ray.serving import app_builder


def app(args: dict[str, Any]) -> Application:
    """Application builder called by ``serve run`` with the ``key=value`` arguments."""
    return app_builder(args)
