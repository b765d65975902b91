"""The lightning-freeze benchmark suite: ``python -m benchmarks [--quick] [--only NAME] [--device cuda]``.

- ``harness``: contenders, alternation, statistics, tables, registry, machine info.
- ``report``: ``results/<name>.json`` and the one ``results/README.md``.
- ``models``, ``loops``, ``lit``: the benchmark network, plain-PyTorch loops, Lightning glue.
- ``comparisons/``: one module per comparison; each registers itself with ``@comparison``.

See docs/benchmarks.md.
"""
