"""Logic puzzles for conditional generation: Sudoku and Zebra (issue 19 §2; docs/puzzles.md).

* ``sudoku``: seeded generator of unique 9×9 puzzles with a difficulty grade;
* ``zebra``: seeded generator of unique Zebra (Einstein) puzzles, clue text and structured form;
* ``verify``: independent verifiers (exact cover for Sudoku, permutation enumeration for Zebra);
* ``format``: puzzles as fixed-length token sequences with a conditioning mask;
* ``metrics``: whole-puzzle (exact / valid) and cell accuracy, per sampler and step count;
* ``dataset``: train/valid/test JSONL + tokenizer + manifest, disjoint by solution (``tools/make_puzzles.py``).

Pure Python (standard library only); imports nothing of the package above ``config``/``utils``.
"""
