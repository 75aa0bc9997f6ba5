"""The batch upscaling job (``jobs/upscale.py``): its inputs and output names (:mod:`.inputs`), the three stages every
image passes through and the rows between them (:mod:`.stages`), its reports (:mod:`.reports`) and the driver that
runs the stages on Ray Data or in-process (:mod:`.job`)."""
