"""``make perf``: what the suite's own machinery costs, as ratios against references measured in the same run.

Every figure is a ratio (or a count) against a reference timed in the same process, with repetitions whose
median (or minimum) is reported, because the machines this runs on are noisy (e.g. 2 cores shared with other
jobs). Sections, one module each:

- ``metrics_section``    Dice/Jaccard/HD95/ASD equal to medpy's (asserted) and the speed-up over medpy; MONAI's HD95;
- ``sliding_window``     the batched LA protocol equals the published per-window loop and is faster;
- ``training_step``      one step in the suite (Lightning, loaders, logging) against a bare PyTorch loop, per method;
- ``loading``            the loaders' batch rate against the step's consumption rate;
- ``memory``             peak RSS of short cpu runs per method and of evaluating the largest test volume;
- ``inference_speed``    2-D images/s at 512x288 and 3-D volumes/min with the LA protocol;
- ``precision``          what ``trainer.precision`` / channels-last do (the CPU path stays fp32).

``python -m benchmark.perf [--quick] [--out perf]`` writes ``report.json`` and ``report.md``. Outside the report,
``python -m benchmark.perf.mms_inference_speed`` compares MMS's prediction paths with its bare network.
"""
