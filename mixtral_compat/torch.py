"""Every use of torch internals (private or undocumented names) in this project, in one place.

CHECKED is the range of torch versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.
"""

PACKAGE = "torch"
CHECKED = ">=2.11,<2.14"  # 2.11 (CUDA, bench/gpu_check.py on an H200) and 2.13 (CPU, the suite)
