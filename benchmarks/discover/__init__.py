"""The stages of the discovery driver (``benchmarks/discovery.py``), one module each.

``common``: the chemical space, the registry sets, progress lines and the resumable stage
runner; ``generate``, ``campaign``, ``hull``, ``confirm`` and ``report``: stages 1-5.
"""
