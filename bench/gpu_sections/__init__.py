"""Method sections of bench/gpu_suite.py, one module per PEFT method (letters in ``METHOD_SECTIONS``).

Each module defines:

* ``TITLE``: the section heading (str).
* ``run(b, cfg, dry) -> list[dict]``: build the layers, then one row per (implementation, shape)
  through ``b.row(base, fn, check, tol=b.tol[dtype], ...)`` — which checks ``fn``'s output against
  a reference first (``check(out) -> {"rel_err_<what>": float}``, use ``b.rel_err(out, ref)``) and
  records FAIL instead of a time when it is wrong. ``b.device``, ``b.time(fn)``,
  ``b.out_of_time()`` are there too. ``cfg`` is gpu_suite's FULL or DRY dict (``cfg["dtype"]``);
  ``dry`` is True for the CPU smoke run (tiny shapes, fp16/fp32, seconds not minutes).
  Every row has ``impl`` and ``status``; a baseline measured in the same run sits beside ours.
* ``render(rows) -> list[str]``: markdown lines (a table with ratios against the baseline).

A missing dependency skips rows with a note (``status="skip"``); it never fails the suite.
"""
