"""The sections of scripts/benchmark.py, one module each, and the helpers they share (common.py).

a. overhead.py, b. epoch.py, c. norms.py, d. cuda.py, e. batch1.py, f. runs_per_gpu.py. Every section builds
its runs through the public training API only (norm_experiments.training.build.make_plan/build/Built and
norm_experiments.training.loop.Run: Run.loop, Run.train_step) and returns its markdown.
"""
