"""Side-by-side benchmark of WriteToTinybird and what users write instead.

``python -m benchmarks`` generates one data set, starts the local Events API
server in another process, runs every scenario in a fresh subprocess of its own
(several times), checks that every event arrived, and prints one table of
medians with the ratios between them. See ``benchmarks/README.md``.
"""
