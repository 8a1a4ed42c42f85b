"""The benchmarks (scripts run as ``python benchmarks/<name>.py``; not part of the installed package). A package
only so that the scripts can share :mod:`benchmarks.runner` by its full name, which no installed module can
shadow."""
