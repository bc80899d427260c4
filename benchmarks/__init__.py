"""The bench: how close the worker gets to its engines' ceiling, in one run, on one device.

Run from a checkout as ``python -m benchmarks`` (PYTHONPATH=the checkout elsewhere); it is measurement
tooling, not part of the product: the wheel and the image leave it out.

One module per thing measured:

- ``ceiling``: the pipeline's engines alone, batch after batch, inputs already in place (what "in place"
  means depends on the runtime: ``ceiling.CEILING_DEFINITIONS``); and the GPU thread alone (pre-decoded
  requests, no Kafka, no decode), which adds batch assembly and result hand-back.
- ``decode_capacity``: decode + CPU pre-processing of the preloaded JPEGs, on 1 and N threads, per decoder.
- ``end_to_end``: the real worker (``worker.service.serve``), Kafka -> decode -> GPU -> Kafka, on a
  preloaded backlog (peak throughput) and under a rate-limited producer (latency at a given load).
- ``baseline``: the per-message loop (consume one, decode, infer one, produce one and wait, commit) on the
  same engines.
- ``broker``: what the local broker can deliver to one consumer with no processing at all.
- ``round_trip``: the broker's own round trip (produce -> consume, no worker) and the latency bound of
  the 50%-load run that uses it.
- ``cpu_time``: CPU per thread group and per process, counted from the first message.
- ``decode_overlap`` (run alone: ``python -m benchmarks.decode_overlap``): a device experiment, whether
  nvImageCodec's decode overlaps inference on the card (it does not: docs/benchmarks.md).

``corpus`` makes the images and the topics; ``loadgen`` is the producer/collector that runs in child
processes so that it does not share the worker's interpreter lock; ``report`` prints the table and writes
the JSON; ``harness`` runs it all in order; ``cli`` parses the command line (``__main__`` runs it).
"""
