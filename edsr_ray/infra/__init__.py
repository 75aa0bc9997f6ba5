"""Plumbing under the product: the Ray connection and its quiet environment (:mod:`~edsr_ray.infra.ray`), the
embedded S3 server (:mod:`~edsr_ray.infra.objectstore`), a local multi-node Ray cluster for tests and demos
(:mod:`~edsr_ray.infra.localcluster`), the cluster-launcher file checks (:mod:`~edsr_ray.infra.launcher`) and the
helpers they share for server processes (:mod:`~edsr_ray.infra.processes`). Nothing here knows about images or
models."""
