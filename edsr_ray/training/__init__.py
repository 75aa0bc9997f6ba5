"""Training EDSR/MDSR on Ray Train, one job per module: the Ray Data patch stream (:mod:`.patches`), the worker-side
batches (:mod:`.batches`), one update (:mod:`.update`), checkpoints (:mod:`.checkpoints`), the worker loop
(:mod:`.loop`) and the driver (:mod:`.run`)."""
