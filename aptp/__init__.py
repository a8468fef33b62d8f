"""The `aptp` command: one thin module per verb in `aptp.commands` (argument parsing and one library call).

Layering (each package imports only those below it): aptp -> benchmarks -> training -> aptp_export -> engines.
"""
