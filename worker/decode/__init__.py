"""Decoding: header checks and limits before any decoder runs (``headers``), a message's whole CPU path
(``message``: envelope, checks, OpenCV, per-model pre-processing), and the GPU decoder of the GPU process
(``nvimgcodec`` with the ``resize_kernel`` it writes each model's rows with)."""
