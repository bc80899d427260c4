"""An intake process: today's asyncio worker (consume, checks, CPU decode pool, publish, DLQ, commit,
backpressure) with the GPU at the other end of a shared-memory link (``process``). The stages
themselves live in worker.app and worker.flow."""
