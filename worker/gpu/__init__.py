"""The GPU process: one per GPU, the only process that touches the device (``process``), and its end
of each intake's link (``link``). The GPU thread itself is worker.gpu.thread.GpuThread."""
