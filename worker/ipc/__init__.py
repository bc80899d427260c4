"""The shared-memory transport between the intake processes and the GPU process.

``shm``: named segments under /dev/shm (create, attach, unlink, clean what a kill -9 left behind);
``wire``: the small control messages (pure packing, no I/O); ``client``: the intake's end of a link;
the GPU process's end is worker.gpu.link.
"""
