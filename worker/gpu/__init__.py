"""The GPU side: ``thread`` (the GPU thread, the only one that touches the device), ``requests`` (what
travels to and from it), ``results`` (its post thread: a finished batch into per-request results),
``process`` (the GPU process of `worker run`) and ``link`` (that process's end of each intake's link)."""
