"""Every use of transformers internals (private or undocumented names) in this project, in one place.

CHECKED is the range of transformers versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.
"""

PACKAGE = "transformers"
CHECKED = ">=5.24,<5.26"
