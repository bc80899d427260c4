"""An intake process and what it is made of: today's asyncio worker (worker.app.Worker: consume loop,
rebalance, drain) and its stages here: ``consume`` (plans, rebalance hooks, backpressure), ``handle``
(one message through checks, decode, the GPU and publish), ``publish`` (records, acknowledged sends),
``commit`` (the contiguous finished prefix, the broker probe), ``socket_reads``; ``process`` runs it
with the GPU process at the other end of a shared-memory link."""
