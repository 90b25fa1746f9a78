"""Where and how the computation runs: the device mesh and shardings, multi-process start-up, the compilation
cache, host memory, timing, and the output folders flaxclf owns."""
