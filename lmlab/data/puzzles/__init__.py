"""Puzzle sets for TRM (Tiny Recursive Models), made or imported by `lmlab puzzles`.

    format   the on-disk layout (the official TRM/HRM arrays plus ratings) and its reader/writer
    sudoku   9x9 Sudoku: exact solver, difficulty rating, seeded generator, augmentations,
             Sudoku-Extreme CSV importer
    maze     mazes (generator and importer)
    arc      ARC tasks (importer and augmentations)
    stage    the `lmlab puzzles` verb

Nothing is imported here: each module is imported where it is used.
"""
