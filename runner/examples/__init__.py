"""Example workloads shipped inside the package.

They are real (small) training scripts that use ``runner.Checkpointer`` the
way a user's script would, so the demo, the drills and the exact-resume tests
exercise the same code path users do. Each is runnable as a module, e.g.
``python -m runner.examples.voice``.
"""
