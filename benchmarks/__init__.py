"""Side-by-side benchmark of WriteToTinybird and what users write instead.

``python -m benchmarks`` generates one data set, starts a counting ``/v0/events``
endpoint (and, for the end-to-end scenario, the local Events API server) in
other processes, runs every scenario in a fresh subprocess of its own (several
times), checks that every event arrived exactly once, and prints one table of
medians with the ratios between them. See ``benchmarks/README.md``.
"""
