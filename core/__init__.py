"""Foundations and evaluation, below the datamodules, the methods and the runner (docs/design.md#layers).

Errors, atomic files, DDP helpers, the dataset spec, the shared resizes, metrics, inference and the evaluator.
Nothing here imports benchmark, methods or datamodules.
"""
